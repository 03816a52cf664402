/* mapping.c: read-only memory maps of whole files (the safetensors reader's zero-copy views).
 *
 * Views handed to JavaScript may outlive the mapping (a garbage-collected ArrayBuffer cannot be revoked).
 * So closing does not unmap: it replaces the file mapping, at the same address, with an anonymous
 * read-only mapping of zero pages (MAP_FIXED). A stale view then reads zeros instead of crashing, the
 * file is released, and what remains costs address space only (no memory: untouched anonymous pages are
 * not allocated, touched ones are the shared zero page). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

struct trtshim_mapping {
    void *data; /* NULL for an empty file */
    uint64_t size;
};

trtshim_status trtshim_mapping_open(const char *path, trtshim_mapping **out) {
    if (out == NULL) return set_error(TRTSHIM_ERR_ARGUMENT, "mapping_open: out is null");
    *out = NULL;
    if (path == NULL) return set_error(TRTSHIM_ERR_ARGUMENT, "mapping_open: path is null");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return set_error(TRTSHIM_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return set_error(TRTSHIM_ERR_IO, "cannot stat '%s': %s", path, strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return set_error(TRTSHIM_ERR_IO, "'%s' is not a regular file", path);
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        close(fd);
        return set_error(TRTSHIM_ERR_IO, "'%s' is %lld bytes, more than this process can map", path,
                         (long long)st.st_size);
    }
    trtshim_mapping *mapping = calloc(1, sizeof(*mapping));
    if (mapping == NULL) {
        close(fd);
        return set_error(TRTSHIM_ERR_MEMORY, "mapping_open '%s': out of memory", path);
    }
    mapping->size = (uint64_t)st.st_size;
    if (mapping->size > 0) {
        void *data = mmap(NULL, (size_t)mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (data == MAP_FAILED) {
            int err = errno;
            close(fd);
            free(mapping);
            return set_error(TRTSHIM_ERR_IO, "cannot map '%s' (%llu bytes): %s", path,
                             (unsigned long long)st.st_size, strerror(err));
        }
        mapping->data = data;
    }
    close(fd); /* the mapping keeps the file alive */
    *out = mapping;
    return TRTSHIM_OK;
}

void trtshim_mapping_close(trtshim_mapping *mapping) {
    if (mapping == NULL) return;
    if (mapping->data != NULL) {
        void *zeros = mmap(mapping->data, (size_t)mapping->size, PROT_READ,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
        /* If the replacement fails, keep the file mapped: unmapping would turn stale views into crashes. */
        (void)zeros;
    }
    free(mapping);
}

trtshim_status trtshim_mapping_data(const trtshim_mapping *mapping, const void **data, uint64_t *size) {
    if (mapping == NULL || data == NULL || size == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "mapping_data: null %s",
                         mapping == NULL ? "mapping" : data == NULL ? "data" : "size");
    *data = mapping->data;
    *size = mapping->size;
    return TRTSHIM_OK;
}

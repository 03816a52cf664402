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
    uint64_t identity[5]; /* device, inode, size, mtime ns, ctime ns (fstat at open) */
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
    mapping->identity[0] = (uint64_t)st.st_dev;
    mapping->identity[1] = (uint64_t)st.st_ino;
    mapping->identity[2] = (uint64_t)st.st_size;
    mapping->identity[3] = (uint64_t)st.st_mtim.tv_sec * 1000000000u + (uint64_t)st.st_mtim.tv_nsec;
    mapping->identity[4] = (uint64_t)st.st_ctim.tv_sec * 1000000000u + (uint64_t)st.st_ctim.tv_nsec;
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

trtshim_status trtshim_mapping_identity(const trtshim_mapping *mapping, uint64_t *identity) {
    if (mapping == NULL || identity == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "mapping_identity: null %s", mapping == NULL ? "mapping" : "identity");
    memcpy(identity, mapping->identity, sizeof(mapping->identity));
    return TRTSHIM_OK;
}

/* Advice about to-be-read ranges. POPULATE maps the range's pages into the page table in one call (a
   read of a fresh mapping otherwise takes a page fault per few pages); on kernels without
   MADV_POPULATE_READ (before 5.14) it falls back to WILLNEED, which only starts reading the file in. */
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

trtshim_status trtshim_mapping_advise(const trtshim_mapping *mapping, uint64_t offset, uint64_t length, int32_t advice) {
    if (mapping == NULL) return set_error(TRTSHIM_ERR_ARGUMENT, "mapping_advise: mapping is null");
    if (offset > mapping->size || length > mapping->size - offset)
        return set_error(TRTSHIM_ERR_ARGUMENT, "mapping_advise: range [%llu, +%llu) outside the %llu-byte mapping",
                         (unsigned long long)offset, (unsigned long long)length, (unsigned long long)mapping->size);
    if (length == 0 || mapping->data == NULL) return TRTSHIM_OK;
    int how;
    switch (advice) {
    case TRTSHIM_ADVISE_WILLNEED: how = MADV_WILLNEED; break;
    case TRTSHIM_ADVISE_SEQUENTIAL: how = MADV_SEQUENTIAL; break;
    case TRTSHIM_ADVISE_POPULATE: how = MADV_POPULATE_READ; break;
    default: return set_error(TRTSHIM_ERR_ARGUMENT, "mapping_advise: unknown advice %d", (int)advice);
    }
    /* madvise wants a page-aligned start. */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t begin = (uintptr_t)mapping->data + (uintptr_t)offset;
    uintptr_t end = begin + (uintptr_t)length;
    begin &= ~(page - 1);
    if (madvise((void *)begin, end - begin, how) == 0) return TRTSHIM_OK;
    if (how == MADV_POPULATE_READ && (errno == EINVAL || errno == ENOSYS) && madvise((void *)begin, end - begin, MADV_WILLNEED) == 0)
        return TRTSHIM_OK;
    /* Advice only: a refusal changes nothing a reader sees. */
    return set_error(TRTSHIM_ERR_IO, "mapping_advise: madvise(%d) on [%llu, +%llu): %s", how, (unsigned long long)offset,
                     (unsigned long long)length, strerror(errno));
}

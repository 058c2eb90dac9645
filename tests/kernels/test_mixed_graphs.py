"""Mixed steps in the fixed layout of their CUDA graphs (worker/mixed_graphs.py): decode rows
padded to a ladder size first, then the prompt chunks absorbed, padding through block 0. Run
eagerly here (the Triton interpreter on the CPU; the capture itself needs a GPU), against the
plain-torch step on the same inputs."""

from __future__ import annotations

import pytest
import torch

from moeserve.worker.mixed_graphs import MixedGraphs, decode_ladder, prompt_ladder
from moeserve.worker.model import AttentionMetadata
from tests.kernels.helpers import TF32_TOL, rel_err
from tests.kernels.test_model_kernel_path import BLOCK, _model, tf32_matmul  # noqa: F401


def test_ladders() -> None:
    assert decode_ladder(256) == [16, 64, 128, 256] and decode_ladder(100) == [16, 64, 100]
    assert decode_ladder(8) == [8]
    assert prompt_ladder(2048) == [128, 256, 512, 1024, 2048] and prompt_ladder(300) == [
        128, 256, 300]


def test_mixed_step_layout_matches_the_torch_step(tiny_v2, request, device):
    request.getfixturevalue("tf32_matmul")
    ref, fast = _model(tiny_v2, device, False), _model(tiny_v2, device, True)
    cfg = ref.config
    tables = {"x": [1, 2, 3], "y": [4, 5], "z": [6, 7, 8], "w": [9, 10, 11]}
    cache = torch.zeros(16, cfg.num_hidden_layers, BLOCK, cfg.kv_dim, device=device)
    gen = torch.Generator().manual_seed(3)
    ctx = dict.fromkeys(tables, 0)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist()

    def torch_step(cache, batch, ids):
        names, qlens = [n for n, _ in batch], [q for _, q in batch]
        meta, pos = AttentionMetadata.build([tables[n] for n in names], [ctx[n] for n in names],
                                            qlens, BLOCK, device)
        with torch.inference_mode():
            return ref(torch.tensor(ids, device=device), pos, cache, meta)

    first = [("x", 9), ("y", 5), ("w", 8)]  # x, y then decode; w continues with a chunk
    torch_step(cache, first, tokens(22))
    for n, q in first:
        ctx[n] += q
    # scheduler order: a new prompt first, decode rows and a continued chunk after it
    batch = [("z", 13), ("x", 1), ("w", 12), ("y", 1)]
    ids = tokens(27)
    want_cache = cache.clone()
    want = torch_step(want_cache, batch, ids)
    graphs = MixedGraphs(fast, cache, torch.zeros(8, dtype=torch.int64, device=device), BLOCK,
                         max_decode_rows=4, max_prompt_tokens=32, max_prompt_seqs=3,
                         max_context=64, backend="triton")
    names, qlens = [n for n, _ in batch], [q for _, q in batch]
    contexts = [ctx[n] for n in names]
    assert graphs.fits(qlens, contexts)
    assert not graphs.fits([1, 1], [3, 4])  # decode only: the decode graphs' step
    assert not graphs.fits([20, 20], [0, 0])  # 40 prompt tokens > 32
    every = list(range(len(ids)))
    if device == "cuda":  # the captured graphs themselves; the capture writes only block 0
        before = cache.clone()
        graphs.capture()
        assert rel_err(cache[1:], before[1:]) == 0
    with torch.inference_mode():
        got = graphs.run(ids, contexts, qlens, [tables[n] for n in names], every)
        assert got.shape == want.shape
        assert rel_err(fast.compute_logits(got), ref.compute_logits(want)) < TF32_TOL
    assert graphs.replays == (1 if device == "cuda" else 0)
    # every real token's latent landed where the torch step put it; padding only in block 0
    assert rel_err(cache[1:], want_cache[1:]) < TF32_TOL


@pytest.mark.slow  # ~50 s: an engine's steps through the Triton interpreter
def test_engine_steps_through_the_mixed_layout(tiny_v2, request, monkeypatch, device):
    """The runner hands mixed steps (decode rows beside prompt chunks, chunks that sample
    nothing) to the mixed layout and samples the right rows: the same greedy tokens as the
    plain-torch engine."""
    from moeserve.common.sampling import SamplingParams
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine

    request.getfixturevalue("tf32_matmul")

    def engine(mixed: bool) -> tuple[LLMEngine, list[int]]:
        # On the CPU, the kernel path through the interpreter against plain torch; on a GPU,
        # captured mixed-step graphs against the eager kernel path.
        eng = LLMEngine(EngineConfig(model=str(tiny_v2), device=device, block_size=BLOCK,
                                     num_kv_blocks=64, max_model_len=128,
                                     max_num_batched_tokens=24, enable_prefix_caching=False))
        runner = eng.runner
        used = [0]
        if mixed:
            if device == "cpu":
                runner.backend = "triton"
                runner.model.fuse_weights()
            graphs = MixedGraphs(runner.model, runner.kv_cache, runner.last_sampled, BLOCK,
                                 max_decode_rows=4, max_prompt_tokens=24, max_prompt_seqs=4,
                                 max_context=128, backend="triton")
            if device == "cuda":
                graphs.capture()
            run = graphs.run

            def counted(*args, **kwargs):
                used[0] += 1
                return run(*args, **kwargs)

            monkeypatch.setattr(graphs, "run", counted)
            runner.mixed_graphs = graphs
        return eng, used

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 400, (n,), generator=gen).tolist() for n in (12, 30, 5)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    outs = []
    for mixed in (False, True):
        eng, used = engine(mixed)
        got: dict[str, list[int]] = {}
        with torch.inference_mode():
            eng.add_request("a", prompts[0], params)
            for step in range(40):
                if step == 2:  # arrives while "a" decodes: its 30 tokens take two chunks
                    eng.add_request("b", prompts[1], params)
                    eng.add_request("c", prompts[2], params)
                for o in eng.step():
                    got.setdefault(o.request_id, []).extend(o.new_token_ids)
                if not eng.has_unfinished_requests():
                    break
        outs.append(got)
        if mixed:
            assert used[0] >= 2  # a chunk that samples nothing, and a chunk beside decodes
            replays = eng.runner.mixed_graphs.replays
            assert replays == (used[0] if device == "cuda" else 0)
    assert outs[1] == outs[0] and all(len(v) == 3 for v in outs[0].values())

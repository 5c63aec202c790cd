"""The fast training step (train/trainer/graphs.py), checked on the CPU: no host sync in forward, loss and
backward for every registered variant; zero graph breaks under fullgraph=True; the run's precision
everywhere under bf16 autocast; a bounded set of shapes over a whole epoch of each task; and the
static-shape step (eager and compiled with inductor) equal to the classic eager step.
CUDA graph capture itself needs a GPU: `GPT2_TEST_DEVICE=cuda` runs test_captured_steps_match_eager."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import GPT2Config, GPT2LMHeadModel, load_tokenizer
from model.heads import LastTokenClassifier
from model.trainable import set_trainable
from modules import attention as attention_module
from modules.registry import VARIANTS
from task_data.batching import LENGTH_BUCKETS, bucket_length, collate, static_lengths
from tests.conftest import DATA_DIR, REPO, TEST_DEVICE
from tests.variant_cases import VARIANT_CASES
from train.base.settings import TrainingSettings
from train.tasks import get_task
from train.trainer import graphs
from train.trainer.graphs import CapturedSteps, EvaluationGraphs, count_host_syncs, why_not_captured

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=500)
NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, lora_dropout=0.0, graph_dropout=0.0)
CASES = {"base": {}, **VARIANT_CASES}
# peft methods whose own layers wait for the host inside forward/backward: the loop measures this on
# its first step and runs them eagerly (docs/gpu.md, "The fast step"); LoHa is the one in this matrix.
SYNCING_CASES = {"peft_loha_r4", "peft_poly_one_task"}


def static_batch(seed: int = 0, rows: int = 4, cap: int = 128) -> dict[str, torch.Tensor]:
    """A right-padded batch collated as the fast step does: a length bucket, a full batch with one
    all-padding row, labels -100 on that row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(3, 30, (1,), generator=gen)) for _ in range(rows - 1)]
    sequences = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in lengths]
    ids, mask = collate(sequences, side="right", pad_id=0, length=bucket_length(max(lengths), cap), rows=rows)
    labels = torch.full((rows,), -100)
    labels[: rows - 1] = torch.randint(0, 3, (rows - 1,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(case: str, seed: int = 0, **extra) -> tuple[GPT2LMHeadModel, LastTokenClassifier]:
    torch.manual_seed(seed)
    config = GPT2Config(**TINY, **NO_DROPOUT, **CASES[case], **extra)
    model = GPT2LMHeadModel(config).train()
    head = LastTokenClassifier(config.n_embd, 3, dropout=0.0)
    set_trainable(model, config.fine_tune_mode, [head])
    return model, head


def fast_loss(model, head, batch) -> torch.Tensor:
    """What the tasks' `loss_on` computes: the LM loss (sonnets) plus a classification head's loss."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(ids, attention_mask=mask, labels=ids, return_logits=False, validate=False, right_padded=True)
    logits = head(out.last_hidden_state, mask)
    return out.loss + F.cross_entropy(logits, batch["labels"], ignore_index=-100)


@pytest.mark.parametrize("case", list(CASES))
def test_zero_host_syncs_in_the_training_step(case):
    model, head = build(case)
    batch = static_batch()

    def step():
        fast_loss(model, head, batch).backward()

    counts = count_host_syncs(step)
    if case in SYNCING_CASES:
        assert sum(counts.values()) > 0, "listed as syncing but does not: update SYNCING_CASES and docs/gpu.md"
    else:
        assert sum(counts.values()) == 0, dict(counts)


def test_the_sync_counter_can_fail():
    """`.item()`, boolean indexing and `nonzero` each wait for the device: the counter sees each."""
    x = torch.randn(8)
    counts = count_host_syncs(lambda: (x.sum().item(), x[x > 0], (x > 0).nonzero()))
    assert counts["_local_scalar_dense"] == 1 and counts["boolean index"] == 1 and counts["nonzero"] >= 1
    counts = count_host_syncs(lambda: (torch.equal(x, x), x.round().unique()))
    assert counts["equal"] == 1 and sum(v for k, v in counts.items() if "unique" in k) == 1


def test_right_padded_is_checked_when_validating():
    model, _ = build("base")
    ids = torch.randint(0, 500, (2, 6))
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="real token after padding"):
        model(ids, attention_mask=left, right_padded=True)
    right = left.flip(-1)
    masked = model(ids, attention_mask=right).logits
    unmasked = model(ids, attention_mask=right, right_padded=True).logits
    real = right.bool()
    torch.testing.assert_close(unmasked[real], masked[real], rtol=1e-5, atol=1e-5)  # exact where it counts


def test_a_pattern_read_by_a_captured_graph_is_never_evicted(monkeypatch):
    from modules import graph as graph_module

    monkeypatch.setattr(graph_module, "_BANDS", type(graph_module._BANDS)())
    monkeypatch.setattr(graph_module, "_PINNED", {(5, None, "cpu")})
    for seq in range(5, 5 + 80):
        graph_module.causal_band(seq, None, torch.device("cpu"))
    assert (5, None, "cpu") in graph_module._BANDS  # the oldest, yet kept
    assert len(graph_module._BANDS) == graph_module._BAND_CACHE_SIZE


# Exceptions, each inside peft's own layers (docs/gpu.md, "The fast step"):
GRAPH_BREAK_CASES = {
    # peft's DoRA calls dequantize_module_weight, which reads type(weight).__module__.startswith(...)
    "dora": "Dynamo does not know how to trace method `startswith`",
    # peft's LoHa reads tensor values on the host (the syncs above)
    "peft_loha_r4": "",
}


# One case per registry entry (and the base, the exceptions, the everything-at-once case): tracing
# costs 5-7 s a case on 2 cores, and the other cases reuse these entries' code.
FULLGRAPH_CASES = [
    "base",
    "lora",
    "dora",
    "kora",
    "kan_ffn",
    "kan_lora",
    "graph",
    "graph_dense_window",
    "peft_ia3",
    "peft_loha_r4",
    "lora_xs",
    "antipasto",
    "peft_prompt_tuning",
    "peft_prefix_tuning+kora",
    "kan_lora+kora+graph",
]


def test_fullgraph_cases_cover_the_registry():
    covered = {v.name for case in FULLGRAPH_CASES for v in GPT2Config(**TINY, **CASES[case]).variants}
    assert covered == set(VARIANTS)


@pytest.mark.parametrize("case", FULLGRAPH_CASES)
def test_no_graph_breaks_with_fullgraph(case):
    """The whole training forward (loss included) traces as one graph (dynamo's eager backend: the
    trace is what breaks, whatever the backend compiles it to)."""
    torch._dynamo.reset()
    model, head = build(case)
    batch = static_batch()
    fast_loss(model, head, batch)  # as in the loop, whose first step is eager (it fills the host-side caches)
    compiled = torch.compile(lambda: fast_loss(model, head, batch), backend="eager", fullgraph=True)
    if case in GRAPH_BREAK_CASES:
        with pytest.raises(Exception, match=GRAPH_BREAK_CASES[case]):  # still breaking: else drop the exception
            compiled()
        return
    assert torch.isfinite(compiled())


@pytest.mark.parametrize("case", list(CASES))
def test_every_variant_computes_in_the_runs_precision(case, monkeypatch):
    """Under bf16 autocast: attention's q, k, v and every projection's output are bf16, and every block
    answers in the same dtype as the base model's (float32: the residual stream adds bf16 updates to
    the float32 embeddings, for every method alike). KAN splines compute in float32 inside on purpose
    (modules/kan.py) but their layers answer in bf16."""
    model, head = build(case)
    seen_sdpa, outputs = [], {}
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen_sdpa.append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", recording_sdpa)
    hooks = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("c_attn", "c_proj", "c_fc") or (name.startswith("transformer.h.") and name.count(".") == 2):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.dtype)))
    batch = static_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_loss(model, head, batch)
    for hook in hooks:
        hook.remove()
    assert seen_sdpa and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen_sdpa), seen_sdpa
    projections = {n: d for n, d in outputs.items() if n.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")}
    assert projections and all(d == torch.bfloat16 for d in projections.values()), projections
    blocks = {n: d for n, d in outputs.items() if n not in projections}
    assert len(blocks) == TINY["n_layer"] and set(blocks.values()) == {torch.float32}, blocks


def _task(name: str, tokenizer, fast_step: bool = False):
    training = TrainingSettings(dev_limit=1, test_limit=1, max_length=None, seed=0)
    task = get_task(name)
    options = None
    if name == "sonnet":
        options = task.settings(max_new_tokens=8, temperature=1.0, greedy=True)
    captured = EvaluationGraphs(name) if fast_step else None  # what the loop gives under --fast_step on
    return task(load_tokenizer(str(tokenizer)), DATA_DIR, training, 1024, options, captured)


@pytest.mark.parametrize("task_name", ["sst", "cfimdb", "quora", "sonnet"])
def test_a_whole_epoch_sees_a_bounded_set_of_shapes(task_name, tokenizer_dir):
    task = _task(task_name, tokenizer_dir)
    batch_size = 16
    shapes = set()
    for batch in task.batches(0, batch_size, seed=0):
        inputs = task.inputs(batch, rows=batch_size)
        shapes.add(tuple(inputs["input_ids"].shape))
        assert inputs["attention_mask"].sum() == task.batch_tokens(batch)  # no token lost, none added
    allowed = {(batch_size, length) for length in static_lengths(task.max_length)}
    assert shapes <= allowed, shapes - allowed
    assert len(allowed) <= len(LENGTH_BUCKETS) + 1  # the documented bound
    # and the classic path (no static shapes) sees many more: the bound is the fast step's doing
    classic = {tuple(task.inputs(b)["input_ids"].shape) for b in task.batches(0, batch_size, seed=0)}
    assert len(classic) > len(shapes)


def test_static_lengths_and_buckets():
    assert static_lengths(128) == [16, 32, 64, 128]
    assert static_lengths(100) == [16, 32, 64, 100]
    assert bucket_length(1, 128) == 16 and bucket_length(17, 128) == 32 and bucket_length(128, 128) == 128
    with pytest.raises(ValueError, match="longer than the cap"):
        bucket_length(129, 128)
    ids, mask = collate([[1, 2], [3]], length=16, rows=4)
    assert ids.shape == (4, 16) and mask.sum() == 3 and mask[2:].sum() == 0
    with pytest.raises(ValueError, match="shorter"):
        collate([[1, 2, 3]], length=2)


def _classic_loss(model, head, batch):
    """The step before the fast path: unpadded rows, the mask applied in the stack, validation on."""
    real = batch["labels"] != -100
    ids, mask, labels = batch["input_ids"][real], batch["attention_mask"][real], batch["labels"][real]
    longest = int(mask.sum(-1).max())
    ids, mask = ids[:, :longest], mask[:, :longest]
    out = model(ids, attention_mask=mask, labels=ids, return_logits=False)
    return out.loss + F.cross_entropy(head(out.last_hidden_state, mask), labels)


def _train(model, head, loss_fn, steps: int, compiled: bool = False) -> list[float]:
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    step_loss = torch.compile(loss_fn, backend="inductor", fullgraph=True) if compiled else loss_fn
    losses = []
    for step in range(steps):
        loss = step_loss(model, head, static_batch(seed=step % 5))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("case", ["base", "lora", "kan_lora", "graph+lora"])
def test_static_shape_step_equals_the_classic_step(case):
    """20 AdamW steps: padding rows, bucket lengths and the mask-free right-padded stack change no
    loss beyond float32 reassociation."""
    classic_model, classic_head = build(case)
    fast_model, fast_head = build(case)
    reference = _train(classic_model, classic_head, _classic_loss, 20)
    losses = _train(fast_model, fast_head, fast_loss, 20)
    assert losses == pytest.approx(reference, rel=2e-4, abs=1e-5)


@pytest.mark.slow
def test_compiled_fast_step_equals_eager():
    """The fast step compiled by inductor (CPU; on CUDA the same code is captured as CUDA graphs) gives
    the eager losses over 20 steps within float32 reassociation (the 5 batches fall in 2 buckets)."""
    torch._dynamo.reset()
    eager_model, eager_head = build("lora")
    compiled_model, compiled_head = build("lora")
    reference = _train(eager_model, eager_head, fast_loss, 20)
    try:
        losses = _train(compiled_model, compiled_head, fast_loss, 20, compiled=True)
    finally:  # later tests count their own compiled graphs
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_why_not_captured_names_each_reason():
    assert why_not_captured("cuda", 1, 1, False) is None
    assert "CUDA device" in why_not_captured("cpu", 1, 1, False)
    assert "multitask" in why_not_captured("cuda", 1, 1, False, tasks=2)
    assert "processes" in why_not_captured("cuda", 2, 1, False)
    assert "grad_accum" in why_not_captured("cuda", 1, 2, False)
    assert "grad_checkpointing" in why_not_captured("cuda:0", 1, 1, True)
    assert "dropout" in why_not_captured("cuda", 1, 1, False, dropout=True)
    assert "virtual" in why_not_captured("cuda", 1, 1, False, model_reason="virtual tokens")


@pytest.mark.parametrize(
    "knobs, reason",
    [
        (dict(use_lora=True), None),
        (dict(peft_method="prefix_tuning", peft_config={"num_virtual_tokens": 2}), "virtual tokens"),
        (dict(use_lora=True, quantize="nf4"), "quantised base"),
        (dict(peft_method="poly"), "host values"),
        (dict(peft_method="trainable_tokens", peft_config={"token_indices": [1, 2]}), "host values"),
    ],
)
def test_models_that_cannot_be_captured_say_why_and_evaluate_eagerly(knobs, reason, tokenizer_dir):
    """The whole-step graph and the evaluation graphs both ask the model; a blocked model evaluates
    eagerly (here the evaluation graphs answer None before any CUDA call)."""
    model = GPT2LMHeadModel(GPT2Config(**{**TINY, "vocab_size": 50257}, **knobs))
    blocker = model.capture_blocker
    assert (blocker is None) if reason is None else (reason in blocker)
    if reason is not None:
        task = _task("sst", tokenizer_dir, fast_step=True)
        assert task.captured(model, None, "cuda", [[1, 2, 3]]) is None


def test_dropout_is_detected_in_every_place_a_step_draws_random_numbers():
    from train.trainer.graphs import uses_dropout

    off = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    assert not uses_dropout(GPT2LMHeadModel(GPT2Config(**TINY, **off)))
    assert uses_dropout(GPT2LMHeadModel(GPT2Config(**TINY, **{**off, "attn_pdrop": 0.1})))  # SDPA's
    assert uses_dropout(GPT2LMHeadModel(GPT2Config(**TINY, **off, use_lora=True, lora_dropout=0.05)))
    assert uses_dropout(GPT2LMHeadModel(GPT2Config(**TINY, **off, use_graph=True, graph_dropout=0.1)))
    assert uses_dropout(GPT2LMHeadModel(GPT2Config(**TINY, **off)), [LastTokenClassifier(32, 2, dropout=0.1)])


def test_captured_steps_refuse_an_optimizer_a_graph_cannot_hold():
    model, _ = build("lora")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="capturable"):
        CapturedSteps(lambda task, inputs: None, [], optimizer, 1.0, "cpu")


@pytest.mark.skipif(not TEST_DEVICE.startswith("cuda"), reason="CUDA graphs need GPT2_TEST_DEVICE=cuda")
@pytest.mark.parametrize("case", ["base", "lora", "kan_lora", "graph+lora", "kora"])
def test_captured_steps_match_eager(case):
    """On CUDA: 12 whole-step graph replays (two shapes, so two graphs sharing one memory pool) give the
    eager step's losses and weights (fp32, dropout off: the same kernels, replayed)."""
    device = TEST_DEVICE
    results = []
    for captured in (False, True):
        model, head = build(case)
        model.to(device), head.to(device)
        params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
        batches = [static_batch(seed=s % 2, cap=128) for s in range(13)]

        def loss_fn(task, inputs, model=model, head=head):
            return fast_loss(model, head, inputs)

        def eager(inputs, params=params, optimizer=optimizer, loss_fn=loss_fn):
            loss = loss_fn("t", {k: v.to(device) for k, v in inputs.items()})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            return loss.item()

        losses = [eager(batches[0])]
        steps = CapturedSteps(loss_fn, params, optimizer, 1.0, device) if captured else None
        for batch in batches[1:]:
            if steps is None:
                losses.append(eager(batch))
            else:
                loss, _ = steps.step("t", batch)
                losses.append(loss.item())
        if steps is not None:
            assert len(steps.graphs) == len({tuple(b["input_ids"].shape) for b in batches[1:]})
        results.append((losses, [p.detach().cpu().clone() for p in params]))
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    for a, b in zip(eager_params, graph_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_gpu_smoke():
    """`scripts/bench_gpu.py --smoke` runs every section at tiny shapes on the CPU, so it never rots."""
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--smoke", "--steps", "1"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for heading in ("Ours vs reference", "Every variant", "longer contexts", "Real loop"):
        assert heading in run.stdout
    assert "error" not in run.stdout.lower() and "failed" not in run.stdout.lower(), run.stdout
    assert "LoRA-KAN r=8 | eager" in run.stdout


@pytest.mark.skipif(not TEST_DEVICE.startswith("cuda"), reason="CUDA graphs need GPT2_TEST_DEVICE=cuda")
def test_captured_evaluation_matches_eager(tokenizer_dir):
    """SST dev predictions through CUDA graphs (static shapes, one replay a batch) equal eager ones."""
    device = TEST_DEVICE
    model = GPT2LMHeadModel(GPT2Config(**{**TINY, "vocab_size": 50257}, **NO_DROPOUT)).to(device).eval()
    head = LastTokenClassifier(TINY["n_embd"], 5).to(device)
    results = {}
    for mode in ("off", "on"):
        task = _task("sst", tokenizer_dir, fast_step=mode == "on")
        run = task.predict(model, head, task.train[:70], batch_size=16, device=device, return_logits=True)
        results[mode] = run
        if mode == "on":
            assert task.captured.cache and next(iter(task.captured.cache.values()))[2].graphs
    assert results["on"].predictions == results["off"].predictions
    torch.testing.assert_close(results["on"].logits, results["off"].logits, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not TEST_DEVICE.startswith("cuda"), reason="CUDA graphs need GPT2_TEST_DEVICE=cuda")
def test_captured_step_skips_a_non_finite_update_and_follows_the_lr_schedule():
    """On CUDA: a replay whose loss is NaN leaves weights, AdamW moments and step counts untouched
    (found_inf), and a learning rate changed in the param groups between replays is the one used."""
    device = TEST_DEVICE
    model, head = build("lora")
    model.to(device), head.to(device)
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
    poison = {"on": torch.zeros((), device=device)}

    def loss_fn(task, inputs):  # the NaN comes from a device tensor, so a replay can carry it
        return fast_loss(model, head, inputs) + torch.where(poison["on"] > 0, float("nan"), 0.0)

    batch = static_batch(seed=0)
    first = loss_fn("t", {k: v.to(device) for k, v in batch.items()})
    first.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    steps = CapturedSteps(loss_fn, params, optimizer, 1.0, device)
    steps.step("t", batch)
    before = [p.detach().clone() for p in params]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in params]
    counts = [optimizer.state[p]["step"].clone() for p in params]
    poison["on"].fill_(1.0)
    loss, _ = steps.step("t", batch)
    assert not torch.isfinite(loss)
    for p, b, m, c in zip(params, before, moments, counts, strict=True):
        assert torch.equal(p, b) and torch.equal(optimizer.state[p]["exp_avg"], m)
        assert torch.equal(optimizer.state[p]["step"], c)
    poison["on"].fill_(0.0)
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # what a scheduler at lr 0 writes: the next replay must not move anything
    steps.step("t", batch)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_capture_registers_generators_first_and_refuses_reseeding(monkeypatch):
    """The path every capture takes (`graphs.recording`), with CUDA's graph faked so it runs on the CPU:
    the step's own generators are registered before capture begins, the capture reports errors
    thread-locally, and seeding or setting an RNG state inside it is a Python error naming the call."""
    events = []

    class FakeGraph:
        def register_generator_state(self, generator):
            events.append(("register", generator))

    @contextlib.contextmanager
    def fake_capture(graph, pool=None, capture_error_mode="global"):
        events.append(("capture", capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    own = [torch.Generator(), torch.Generator()]
    with graphs.recording(FakeGraph(), None, own):
        for call, args in [(torch.manual_seed, (0,)), (torch.cuda.manual_seed_all, (0,)), (torch.set_rng_state, ())]:
            with pytest.raises(RuntimeError, match="inside a captured step"):
                call(*args)
    assert events == [("register", own[0]), ("register", own[1]), ("capture", "thread_local")]
    assert torch.manual_seed(0) is not None  # restored after the capture


def test_step_generators_finds_the_cuda_generators_modules_hold():
    """A module that keeps a CUDA generator of its own (faked here: a CPU build has none) gets it
    registered with every graph; CPU generators and the default one are not the graph's concern."""

    class CudaGenerator(torch.Generator):
        @property
        def device(self):
            return torch.device("cuda")

    model = GPT2LMHeadModel(GPT2Config(**TINY))
    assert graphs.step_generators(model) == []  # every dropout here draws from the default generator
    own = CudaGenerator()
    model.transformer.h[1].mlp.noise = own
    model.transformer.h[0].attn.noise = torch.Generator()  # CPU
    head = torch.nn.Linear(2, 2)
    head.noise = own  # shared: registered once
    assert graphs.step_generators(model, head) == [own]


def test_dropout_capture_diagnostic_switch(monkeypatch):
    """Dropout keeps a run off the CUDA graphs, except for the diagnostic GPT2_CAPTURE_DROPOUT=1."""
    monkeypatch.delenv("GPT2_CAPTURE_DROPOUT", raising=False)
    assert "dropout" in why_not_captured("cuda", 1, 1, False, dropout=True)
    monkeypatch.setenv("GPT2_CAPTURE_DROPOUT", "1")
    assert why_not_captured("cuda", 1, 1, False, dropout=True) is None

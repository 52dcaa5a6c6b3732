"""probe-memory: the live-bytes tracker against hand counts, the fake-tensor estimate against a real
CPU step measured by torch.profiler, the search and recommendation, and the command line."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from torch import nn
from typer.testing import CliRunner

from mmret.cli import app
from mmret.common.progress import NULL
from mmret.encoders import load_image_encoder, load_text_encoder
from mmret.errors import MmretError
from mmret.memory import (
    Breakdown,
    Candidate,
    LiveBytes,
    NothingFits,
    Probe,
    Row,
    build_model,
    describe,
    fake_probe,
    largest_fitting,
    measured,
    micro_batches,
    needed,
    probe_memory,
    recommend,
    size_text,
    smallest_row,
)
from mmret.memory.plan import _measure_rows
from mmret.memory.probe import _fake_mode
from mmret.methods import get_method
from mmret.runs import RunConfig, with_overrides

runner = CliRunner()


@pytest.fixture
def one_thread():
    """Real CPU steps of tiny models are thousands of small ops: on a busy machine, threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {k: str(v) for k, v in tiny_models.save_all(root).items()}


def config(**options) -> RunConfig:
    return with_overrides(RunConfig(), {"embed_dim": 16, "dataset": "none", **options})


# ---------------------------------------------------------------------------- counted by hand


def test_live_bytes_of_a_linear_stack_match_the_hand_count():
    """3 Linear(d, d) with ReLUs, AdamW, loss = mean(out^2): every category counted by hand."""
    B, d = 32, 64
    with _fake_mode() as mode:
        model = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        optimizer = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    with mode, LiveBytes():  # the first step creates AdamW's moments; `.item()` needs the tracker on fake tensors
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with mode, LiveBytes(model, optimizer) as live:
        x = torch.randn(B, d)
        model(x).pow(2).mean().backward()
        optimizer.step()
    weights = 3 * (d * d + d) * 4
    # backward keeps x (for the first weight's gradient), both ReLU outputs (for their own backward and
    # the next weights' gradients) and the last output (for pow); the pre-ReLU outputs are freed
    saved = 4 * B * d * 4
    assert live.at_peak["weights"] == weights
    assert live.bytes["gradients"] == weights
    assert live.bytes["optimizer"] == pytest.approx(2 * weights + 6 * 4, rel=0.05)  # exp_avg, exp_avg_sq, 6 steps
    assert live.at_backward["activations"] == pytest.approx(saved, rel=0.05)
    assert live.at_backward["gradients"] == 0
    assert live.peak >= weights + 2 * weights + saved


# ---------------------------------------------------------------------------- against a real CPU step


def _profiled_peak(probe: Probe, precision: str, micro_batch: int) -> int:
    """Peak live tensor bytes of one real `train_step`: what is alive when it starts (weights,
    AdamW's moments) plus the largest running sum of the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    step = probe.configure(precision, probe.cfg.train.batch_size, micro_batch)
    probe.optimizer.zero_grad(set_to_none=True)
    probe.model.train()
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for t in [*probe.model.parameters(), *probe.model.buffers(),
                       *(v for st in probe.optimizer.state.values() for v in st.values())]}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        step(*probe.inputs.make(probe.cfg.train.batch_size), 0)
    stack, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            events.append((event.start_time_ns, event.typed[1].alloc_size))
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return sum(alive.values()) + peak


# (method options, precision, micro-batch): the bridge in one pass; LoRA with gradient caching over
# four micro-batches, in fp32 and under bf16 autocast (fp32 weights, gradients and moments)
CPU_CASES = {
    "bridge": (lambda t: dict(method="bridge", item=t["timm"], text=t["bert"], batch_size=32), "fp32", 32),
    "lora": (lambda t: dict(method="lora", model=t["clip"], batch_size=16, rank=4), "fp32", 4),
    "lora-bf16": (lambda t: dict(method="lora", model=t["clip"], batch_size=16, rank=4), "bf16", 4),
}


@pytest.mark.parametrize("case", CPU_CASES)
def test_estimate_matches_a_profiled_cpu_step(towers, case, one_thread):
    options, precision, micro = CPU_CASES[case]
    cfg = config(**options(towers))
    torch.manual_seed(0)
    real = Probe(cfg, *build_model(cfg, "cpu"), torch.device("cpu"))
    real.warm_up()
    estimate = fake_probe(cfg, target="cpu")
    estimate.warm_up()
    truth = _profiled_peak(real, precision, micro)
    assert estimate.step(precision, micro).total == pytest.approx(truth, rel=0.15)


def test_gradient_caching_shortcut_equals_running_the_whole_batch(towers):
    """A fake step over one micro-batch plus what grows with the batch = the whole batch, run."""
    cases = [(dict(method="lora", model=towers["clip"], rank=4, grad_checkpointing=True), "bf16"),
             (dict(method="bridge", item=towers["timm"], text=towers["bert"], accumulation="plain", mixup=0.4,
                   sam=True), "bf16")]
    for options, precision in cases:
        probe = fake_probe(config(batch_size=8, **options))
        probe.warm_up()
        whole = probe._step_at(precision, 8, 2)  # four micro-batches, run
        assert probe.step(precision, 2).total == pytest.approx(whole.total, rel=0.01), options


def test_features_methods_count_no_tower_and_bf16_keeps_fp32_master_weights(towers):
    probe = fake_probe(config(method="heads", item=towers["timm"], text=towers["bert"], batch_size=8))
    probe.warm_up()
    params = sum(-(-p.numel() * 4 // 512) * 512 for p in probe.model.parameters())
    fp32, bf16 = probe.step("fp32", 8), probe.step("bf16", 8)
    assert fp32.weights == bf16.weights == params  # only the heads: the towers never run
    assert fp32.optimizer == bf16.optimizer >= 2 * params - 1024


# ---------------------------------------------------------------------------- towers from configs


def skeleton_image_encoder(name: str):
    return load_image_encoder(name, meta=True)


def skeleton_text_encoder(name: str, max_length: int | None = None):
    return load_text_encoder(name, max_length=max_length, meta=True)


@pytest.mark.parametrize("kind", ["timm", "dinov2", "clip"])
def test_skeleton_image_towers_match_the_loaded_ones(towers, kind):
    real, skeleton = load_image_encoder(towers[kind]), skeleton_image_encoder(towers[kind])
    assert next(skeleton.parameters()).device.type == "meta"
    assert sum(p.numel() for p in skeleton.parameters()) == sum(p.numel() for p in real.parameters())
    assert (skeleton.dim, skeleton.token_dim, skeleton.image_size, skeleton.pooling) == \
        (real.dim, real.token_dim, real.image_size, real.pooling)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "minilm", "clip"])
def test_skeleton_text_towers_match_the_loaded_ones(towers, kind):
    real, skeleton = load_text_encoder(towers[kind], max_length=64), skeleton_text_encoder(towers[kind], 64)
    assert sum(p.numel() for p in skeleton.parameters()) == sum(p.numel() for p in real.parameters())
    assert (skeleton.dim, skeleton.token_dim, skeleton.max_length, skeleton.pooling) == \
        (real.dim, real.token_dim, real.max_length, real.pooling)


def test_presets_have_the_published_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    clip = count(skeleton_image_encoder("clip-b32")) + count(skeleton_text_encoder("clip-b32"))
    assert clip + 1 == 151_277_313  # openai/clip-vit-base-patch32, whose logit scale is the + 1
    assert count(skeleton_image_encoder("dino-vits16")) == 21_665_664  # ViT-S/16 without its 1000-class head
    assert count(skeleton_text_encoder("distilbert")) == 66_362_880  # distilbert-base-uncased


def test_an_unknown_encoder_is_one_line():
    with pytest.raises(MmretError, match="unknown image encoder 'nope'"):
        skeleton_image_encoder("nope")


# ---------------------------------------------------------------------------- search and choice


def test_micro_batches_halve_down_to_one():
    assert micro_batches(128) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert micro_batches(100) == [100, 50, 25, 13, 7, 4, 2, 1]


@pytest.mark.parametrize("limit", [0, 1, 5, 37, 100])
def test_largest_fitting_finds_the_boundary_in_few_calls(limit):
    calls = []
    found = largest_fitting(1, 100, lambda n: calls.append(n) or n <= limit)
    assert found == (limit or None)
    assert len(calls) <= 9


def test_measured_turns_out_of_memory_into_none():
    def step():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert measured(step, torch.device("cpu")) is None
    assert measured(lambda: Breakdown(weights=3), torch.device("cpu")).total == 3


def test_the_search_on_real_steps_stops_at_the_largest_micro_batch_that_fits(towers, one_thread):
    cfg = config(method="lora", model=towers["clip"], rank=4, batch_size=8)
    probe = Probe(cfg, *build_model(cfg, "cpu"), torch.device("cpu"))
    probe.warm_up()
    floor, steps, m0 = max(probe.setup().total, probe.evaluate("fp32").total), {}, None
    for m in range(1, 9):  # up to one past the first micro-batch whose step is the peak
        steps[m] = probe.step("fp32", m).total
        if m0 is not None:
            break
        m0 = m if steps[m] > floor else None
    assert m0 < 8 and steps[m0] < steps[m0 + 1]
    usable = (needed(steps[m0]) + needed(steps[m0 + 1])) // 2
    rows = _measure_rows(cfg, get_method("lora"), torch.device("cpu"), usable, NULL, precisions=("fp32",))
    rows = [r for r in rows if not r.candidate.grad_checkpointing]
    assert max(r.candidate.micro_batch for r in rows if r.fits) == m0
    assert all(r.candidate.micro_batch > m0 for r in rows if not r.fits)
    steps[8] = probe.step("fp32", 8).total
    compared = [(r.phases["step"], steps[r.candidate.micro_batch]) for r in rows if r.candidate.micro_batch in steps]
    assert len(compared) >= 3 and all(a == b for a, b in compared)  # the search measures what a step takes
    assert len(rows) <= 5  # 8 first, then 1, then a bisection


def test_recommendation_is_mixed_precision_then_fewest_passes_then_largest_micro_batch():
    def row(m, precision, ckpt=False, fits=True):
        return Row(Candidate(m, precision, ckpt, False), Breakdown(), {"step": 1}, fits)

    rows = [row(128, "fp32"), row(64, "bf16"), row(128, "bf16", ckpt=True), row(32, "bf16"),
            row(128, "bf16", fits=False)]
    assert recommend(rows, 128) is rows[2]  # two passes either way: the larger micro-batch wins
    assert recommend(rows[:2] + rows[3:], 128) is rows[1]
    assert recommend([row(8, "fp32", fits=False)], 128) is None


def test_nothing_fits_names_the_smallest_requirement_and_what_would_cut_it(towers):
    cfg = config(method="lora", model=towers["clip"], rank=4, batch_size=2)
    with pytest.raises(NothingFits) as error:
        probe_memory(cfg, 0.0001, reserve=0, how="estimate")
    rows, message = error.value.rows, str(error.value)
    assert len(rows) == 2 * 2 * 2 and not any(r.fits for r in rows)  # micro-batch 2, 1 x fp32, bf16 x checkpointing
    smallest = min(r.peak for r in rows)
    assert error.value.smallest.peak == smallest
    assert message.startswith("nothing fits in 0.0001 GB (0.1 MB after 0.0 MB for the CUDA context): "
                              "the smallest configuration (micro-batch ")
    assert f"needs {size_text(needed(smallest))} with the 10% margin; what would cut it: " in message
    assert message.endswith("a lower --rank than 4, adapting one tower (--tower text), cached features "
                            "(--method bridge or heads: the towers never run in training), a shorter --max-length, "
                            "smaller towers")


# ---------------------------------------------------------------------------- the command line


def test_probe_memory_recommends_and_saves_a_config_train_accepts(towers, data_dir, tmp_path):
    path = tmp_path / "fits.json"
    args = ["probe-memory", "--vram", "1", "--reserve", "0", "--method", "lora", "--model", towers["clip"],
            "--rank", "4", "--batch-size", "4", "--embed-dim", "16", "--save", str(path)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "best" in result.stdout and "estimated: one training step per candidate on fake tensors" in result.stdout
    assert "recommended: micro-batch 4 of 4, bf16, towers run every step" in result.stdout
    saved = json.loads(path.read_text())
    assert saved["train"]["precision"] == "auto" and saved["train"]["micro_batch"] is None
    assert "runs_dir" not in saved and "data_dir" not in saved["data"]
    assert RunConfig.from_dict(saved).method.rank == 4
    dry = runner.invoke(app, ["train", "--config", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "parameters: lora" in dry.stdout


def test_probe_memory_prints_the_exact_nothing_fits_line(towers, example_ds):
    args = ["probe-memory", "--vram", "0.0001", "--reserve", "0", "--method", "heads", "--vision", towers["timm"],
            "--text", towers["bert"], "--batch-size", "16", "--embed-dim", "256", "--dataset", "example"]
    cfg = config(method="heads", item=towers["timm"], text=towers["bert"], batch_size=16, dataset="example",
                 embed_dim=256)
    smallest = smallest_row(probe_memory(cfg, 1.0, reserve=0, how="estimate").rows, 16)
    assert smallest.phase == "step"  # so no cut for the evaluation or the setup sample is named
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.splitlines(keepends=True)[-1] == (
        f"error: nothing fits in 0.0001 GB (0.1 MB after 0.0 MB for the CUDA context): the smallest configuration "
        f"({describe(smallest.candidate, 16)}) needs {size_text(needed(smallest.peak))} with the 10% margin; "
        "what would cut it: a smaller --embed-dim than 256, smaller towers\n")


@pytest.mark.parametrize("args, line", [
    (["--vram", "0"], "error: --vram must be a positive number of GB, got 0.0"),
    (["--vram", "6", "--method", "zeroshot"], "error: unknown method 'zeroshot'; choose one of "),
    (["--vram", "6", "--config", "missing.json"], "error: --config missing.json: no such file"),
])
def test_probe_memory_bad_input_is_one_red_line(data_dir, args, line):
    result = runner.invoke(app, ["probe-memory", *args])
    assert result.exit_code == 1
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr

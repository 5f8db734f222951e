"""Capture hooks and plans on a small random Flux, without any file loading."""

import threading

import pytest
import torch

from flux.capture import BlockCapture, BufferPool, CapturePlan
from flux.configs import TINY_PARAMS
from flux.errors import UsageError
from flux.model import Flux
from flux.sampling import denoise, get_noise, get_schedule, prepare
from flux.store import PtSink, assemble


@pytest.fixture(scope="module")
def model() -> Flux:
    torch.manual_seed(0)
    return Flux(TINY_PARAMS).eval().requires_grad_(False)


def _inputs(seed: int = 3, height: int = 48, width: int = 64):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(1, 5, TINY_PARAMS.context_in_dim, generator=g)
    y = torch.randn(1, TINY_PARAMS.vec_in_dim, generator=g)
    return prepare(get_noise(1, height, width, "cpu", torch.float32, seed), txt, y)


def _run(model, plan=None, num_steps=3):
    inp = _inputs()
    timesteps = get_schedule(num_steps, inp["img"].shape[1])
    args = {k: inp[k] for k in ("img", "img_ids", "txt", "txt_ids", "vec")}
    if plan is None:
        return denoise(model, **args, timesteps=timesteps, guidance=3.5), None
    txt_len, img_len = inp["txt"].shape[1], inp["img"].shape[1]
    shapes, dtypes = BlockCapture.shapes_for(model, plan, 1, txt_len, img_len, torch.float32)
    pool = BufferPool(shapes, dtypes, pin=False)
    steps = []
    with BlockCapture(model, plan, pool, txt_len) as cap:
        out = denoise(
            model, **args, timesteps=timesteps, guidance=3.5,
            before_step=lambda info: cap.begin_step(info.index, info.img),
            after_step=lambda info: steps.append(cap.end_step()),
        )  # fmt: skip
    return out, steps


def test_capture_is_observation_only(model):
    plain, _ = _run(model)
    captured, _ = _run(model, CapturePlan.everything(model, 3))
    assert torch.equal(plain, captured)


def test_captured_outputs_equal_block_outputs_seen_by_independent_hooks(model):
    seen = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(("d", i), []).append(o))
        for i, b in enumerate(model.double_blocks)
    ] + [
        b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(("s", i), []).append(o.clone()))
        for i, b in enumerate(model.single_blocks)
    ]
    try:
        _, steps = _run(model, CapturePlan.everything(model, 3))
    finally:
        for h in handles:
            h.remove()
    for k, step in enumerate(steps):
        for i in range(len(model.double_blocks)):
            assert torch.equal(step.tensors[f"double_blocks.{i}.img"], seen[("d", i)][k][0])
            assert torch.equal(step.tensors[f"double_blocks.{i}.txt"], seen[("d", i)][k][1])
        for i in range(len(model.single_blocks)):
            assert torch.equal(step.tensors[f"single_blocks.{i}"], seen[("s", i)][k])


def test_hooks_removed_after_run_and_after_error(model):
    plan = CapturePlan.everything(model, 2)
    _run(model, plan, num_steps=2)
    modules = [*model.double_blocks, *model.single_blocks, model.final_layer]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)

    pool = BufferPool(*BlockCapture.shapes_for(model, plan, 1, 5, 12, torch.float32), pin=False)
    with pytest.raises(RuntimeError, match="boom"), BlockCapture(model, plan, pool, 5):
        assert model.double_blocks[0]._forward_hooks
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_hooks_removed_when_sampling_raises_mid_run(model, tmp_path):
    """An error inside the sampler (here: in the model call of step 1, from a block) leaves no hook behind."""
    from flux.pipeline import CaptureSession, sample

    plan = CapturePlan.everything(model, 3)
    inp = _inputs()
    meta = {"captured_steps": [0, 1, 2], "captured_blocks": {"double": [0, 1], "single": [0, 1, 2]}}
    session = CaptureSession.open(model, plan, "pt", tmp_path / "c.pt", 5, 12, torch.float32, meta, 3)
    calls = []

    def fail_on_second_step(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in step 1")

    trap = model.single_blocks[1].register_forward_pre_hook(fail_on_second_step, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom in step 1"):
            sample(model, inp, get_schedule(3, 12), 3.5, session)
    finally:
        trap.remove()
    modules = [*model.double_blocks, *model.single_blocks, model.final_layer]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    assert len(session.sink.steps) == 1  # step 0 finished, step 1 never reached the sink


def test_context_records_state_before_each_call_and_vec(model):
    _, steps = _run(model, CapturePlan.everything(model, 3))
    inp = _inputs()
    timesteps = get_schedule(3, inp["img"].shape[1])
    # The first img_state is the packed noise itself; vec is the model's own conditioning at that step.
    assert torch.equal(steps[0].tensors["img_state"], inp["img"])
    for k, step in enumerate(steps):
        t = torch.full((1,), timesteps[k])
        expected_vec = model.conditioning(t, inp["vec"], torch.full((1,), 3.5))
        assert torch.equal(step.tensors["vec"], expected_vec)


def test_plan_selects_exactly_what_it_names(model):
    plan = CapturePlan.parse("double:1,single:0-2:2", "1", "img", "fp16", 2, 3, 3)
    assert plan.double == (1,) and plan.single == (0, 2) and plan.steps == (1,)
    _, steps = _run(model, plan)
    assert [s.captured for s in steps] == [False, True, False]
    assert set(steps[0].tensors) == {"img_state", "vec", "pred"}
    captured = steps[1].tensors
    assert set(captured) == {
        "img_state", "vec", "pred", "double_blocks.1.img", "single_blocks.0", "single_blocks.2"
    }  # fmt: skip
    assert captured["single_blocks.0"].shape == (1, 12, TINY_PARAMS.hidden_size)  # image tokens only
    assert captured["single_blocks.0"].dtype == torch.float16
    assert captured["img_state"].dtype == torch.float32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,3", [0, 3]),
        ("2-5", [2, 3, 4, 5]),
        ("0-9:5", [0, 5]),
        ("all", list(range(10))),
        ("4:3", [4, 7]),
        ("1:4", [1, 5, 9]),  # start:stride runs to the last step, 9
        ("0:3", [0, 3, 6, 9]),
    ],
)
def test_step_ranges(text, expected):
    assert list(CapturePlan.parse(None, text, "both", None, 2, 3, 10).steps) == expected


@pytest.mark.parametrize(
    ("text", "double", "single"),
    [
        ("single:0,2", (), (0, 2)),  # a bare range belongs to the kind before it
        ("double:1,single:0-1,2", (1,), (0, 1, 2)),
        ("double:0,1,single:2", (0, 1), (2,)),
        ("double:1,single:1,0-2:2", (1,), (0, 1, 2)),  # strides too
        ("single:all", (), (0, 1, 2)),
    ],
)
def test_block_lists_name_their_kind_once(text, double, single):
    plan = CapturePlan.parse(text, None, "both", None, 2, 3, 10)
    assert (plan.double, plan.single) == (double, single)


@pytest.mark.parametrize(
    ("blocks", "steps", "streams", "dtype", "flag"),
    [
        ("triple:0", None, "both", None, "--blocks"),
        ("0,double:1", None, "both", None, "--blocks"),  # a range before any kind
        ("double:0,", None, "both", None, "--blocks"),  # not "all double blocks"
        ("double:", None, "both", None, "--blocks"),
        ("double: ", None, "both", None, "--blocks"),
        ("double:0,all", None, "both", None, "--blocks"),  # all double blocks, or every block? Say which.
        ("double:0,,1", None, "both", None, "--blocks"),
        ("double:0-9", None, "both", None, "--blocks"),
        ("double:x", None, "both", None, "--blocks"),
        (None, "5-2", "both", None, "--steps"),
        (None, "10", "both", None, "--steps"),
        (None, "-1", "both", None, "--steps"),
        (None, None, "image", None, "--streams"),
        (None, None, "both", "int8", "--capture_dtype"),
    ],
)
def test_bad_plans_name_the_flag(blocks, steps, streams, dtype, flag):
    with pytest.raises(UsageError, match=flag):
        CapturePlan.parse(blocks, steps, streams, dtype, 2, 3, 10)


def test_bytes_per_step_matches_the_issue_figure():
    # 57 blocks of bf16 at 3072 wide: 6,144 bytes per token per step (double: img + txt; single: txt + img).
    plan = CapturePlan(tuple(range(19)), tuple(range(38)), (0,))
    per_step = plan.bytes_per_step(1, txt_len=256, img_len=256, hidden=3072, itemsize=2)
    assert per_step == 57 * 2 * 3072 * (256 + 256)


def test_pt_structure_from_steps(model, tmp_path):
    plan = CapturePlan.everything(model, 3)
    _, steps = _run(model, plan)
    meta = {"captured_steps": [0, 1, 2], "captured_blocks": {"double": [0, 1], "single": [0, 1, 2]}}
    capture = assemble(steps, {"txt_seq_len": 5}, meta)
    assert len(capture["double_blocks"]["block_1"]) == 3
    img, txt = capture["double_blocks"]["block_1"][2]
    assert img.shape == (1, 12, 64) and txt.shape == (1, 5, 64)
    assert capture["single_blocks"]["block_2"][0].shape == (1, 17, 64)
    assert len(capture["denoising_context"]["img_state"]) == 3
    path = PtSink(tmp_path / "c.pt", None).path
    torch.save(capture, path)
    loaded = torch.load(path, weights_only=True)  # the default from torch 2.6; 2.4 and 2.5 need it said
    assert torch.equal(loaded["single_blocks"]["block_2"][1], capture["single_blocks"]["block_2"][1])


def test_a_released_context_set_is_never_handed_out_for_a_captured_step(model):
    """Steps the plan skips get context-only sets; once released they must not come back as a full set, or
    a captured step's shard would silently lack its block outputs."""
    plan = CapturePlan.parse(None, "1", "both", None, 2, 3, 3)
    shapes, dtypes = BlockCapture.shapes_for(model, plan, 1, 5, 12, torch.float32)
    pool = BufferPool(shapes, dtypes, pin=False, limit=1)
    context_only = pool.acquire(captured=False)
    assert set(context_only) < set(shapes)
    pool.release(context_only)
    full = pool.acquire(captured=True)
    assert set(full) == set(shapes)
    pool.release(full)
    assert set(pool.acquire(captured=True)) == set(shapes) and set(pool.acquire(captured=False)) < set(shapes)


@pytest.mark.parametrize("captured", [True, False], ids=["full", "context-only"])
def test_a_limited_pool_waits_for_a_released_set_of_either_kind(model, captured):
    """When the disk falls behind, neither kind of set grows past the limit: the sampler waits for a set to
    come back, so host memory stays at `limit` steps however many steps the plan skips."""
    plan = CapturePlan.parse(None, "1", "both", None, 2, 3, 3)
    pool = BufferPool(*BlockCapture.shapes_for(model, plan, 1, 5, 12, torch.float32), pin=False, limit=2)
    held = [pool.acquire(captured), pool.acquire(captured)]
    got = []
    waiting = threading.Thread(target=lambda: got.append(pool.acquire(captured)), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and not got  # no third set
    pool.release(held[0])
    waiting.join(30)
    assert got and got[0] is held[0] and pool.count[captured] == 2
    pool.release(held[1])
    pool.release(got[0])
    pool.drain()  # all back: none is counted as allocated any more
    assert pool.count == {True: 0, False: 0}

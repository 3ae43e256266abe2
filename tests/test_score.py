"""Scoring: preprocessing identical to the weights' transform, backends that agree, shards that resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _synth import make_checkpoint, make_imagefolder
from PIL import Image

from audit.datasets import decode_image, load_dataset
from audit.errors import ModelError
from audit.scoring import (
    OnnxRuntimeRunner,
    OpenVINORunner,
    ScoreStats,
    TorchRunner,
    _shard_batches,
    export_onnx,
    forward_batch,
    make_runner,
    normalize,
    resize_crop,
    resolve_backend,
    score_dataset,
)
from audit.zoo import Preprocess, resolve_model

torch = pytest.importorskip("torch")

LITE_PRE = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TV_PRE = Preprocess(
    resize=232, crop=224, interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
CPU_BACKENDS = [b for b in ("openvino", "onnxruntime") if __import__("importlib.util").util.find_spec(b)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mnv3.pth")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("ds"), per_class=5, size=(70, 52))
    return load_dataset(root)


@pytest.mark.parametrize("pre", [LITE_PRE, TV_PRE], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (227, 227), (1, 1), (640, 97)])
def test_resize_crop_then_normalize_is_bit_identical_to_the_weights_transform(tmp_path, pre, size):
    rng = np.random.default_rng(sum(size))
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    img = decode_image(path)
    want = pre.transform()(img)
    crop = resize_crop(img, pre)
    assert crop.dtype == np.uint8 and crop.shape == (pre.crop, pre.crop, 3)
    for cl in (True, False):
        got = normalize(torch.from_numpy(crop[None]), pre, channels_last=cl)[0]
        assert torch.equal(got.contiguous(), want), "same float32 ops as ToDtype(scale=True) + Normalize"
    assert normalize(torch.from_numpy(crop[None]), pre, channels_last=True).is_contiguous(
        memory_format=torch.channels_last
    )


def test_shard_batches_never_straddle_a_shard():
    batches = _shard_batches([0, 2], n=23, shard_size=10, batch_size=4)
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [20, 21, 22]]
    # Batches of a shard are the same whichever shards are still to do: a resumed run recomputes them alike.
    assert _shard_batches([2], 23, 10, 4) == [[20, 21, 22]]


def test_resolve_backend_and_precision_checks():
    assert resolve_backend("torch", "cuda") == "torch"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("auto", "cpu") == (CPU_BACKENDS[0] if CPU_BACKENDS else "torch")
    with pytest.raises(ModelError, match="choose one of"):
        resolve_backend("tensorrt", "cpu")
    with pytest.raises(ModelError, match="runs on the CPU"):
        resolve_backend("openvino", "cuda")
    spec = resolve_model("mobilenet_v3_small")
    with pytest.raises(ModelError, match="fp16 needs a GPU"):
        make_runner(None, spec, backend="torch", device="cpu", precision="fp16")


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_runners_match_eager_fp32(checkpoint, backend):
    from audit.zoo import build_model

    spec = resolve_model(checkpoint)
    model = build_model(spec)
    rng = np.random.default_rng(0)
    u8 = torch.from_numpy(rng.integers(0, 256, (5, 224, 224, 3), dtype=np.uint8))
    with torch.inference_mode():
        want = model(normalize(u8, spec.preprocess, channels_last=False)).numpy()
    runner = make_runner(build_model(spec), spec, backend=backend, device="cpu")
    assert runner.backend == backend
    (got,) = forward_batch([runner], [u8])
    assert got.dtype == torch.float32 and got.shape == (5, 1000)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_forward_batch_still_takes_bare_modules(checkpoint):
    from audit.zoo import build_model

    spec = resolve_model(checkpoint)
    model = build_model(spec)
    x = torch.randn(2, 3, 64, 64)
    (a,) = forward_batch([model], [x], channels_last=False)
    (b,) = forward_batch([model], [x], channels_last=True)
    assert a.shape == (2, 1000)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_openvino_runner_chunks_and_pins_fp32(checkpoint):
    if "openvino" not in CPU_BACKENDS:
        pytest.skip("openvino is not installed")
    from audit.zoo import build_model

    spec = resolve_model(checkpoint)
    onnx = export_onnx(build_model(spec), 224)
    whole = OpenVINORunner(onnx, spec.preprocess, chunk=64)
    parts = OpenVINORunner(onnx, spec.preprocess, chunk=3)
    assert whole.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    u8 = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (7, 224, 224, 3), dtype=np.uint8))
    np.testing.assert_allclose(whole(u8).numpy(), parts(u8).numpy(), atol=1e-4)
    assert isinstance(OnnxRuntimeRunner, type)


_SIGNAL_STACK_CHILD = """
import faulthandler, gc, signal, subprocess, sys
faulthandler.enable()  # an alternate signal stack on the main thread, as under pytest
from audit.scoring import OpenVINORunner, export_onnx
from audit.zoo import build_model, resolve_model
spec = resolve_model(sys.argv[1])
onnx = export_onnx(build_model(spec), 64)
a, b, c = (OpenVINORunner(onnx, spec.preprocess) for _ in range(3))
del a; gc.collect()  # freed first-in, first-out: the order that used to break the stack
del c; gc.collect()
d = OpenVINORunner(onnx, spec.preprocess)  # a later scoring in the same process
del b; gc.collect()
del d; gc.collect()
signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's DataLoader leaves behind
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("alive")
"""


def test_openvino_runners_leave_the_signal_stack_usable(checkpoint):
    """Runners freed out of order, then a child exits: the process must survive the SIGCHLD."""
    if "openvino" not in CPU_BACKENDS:
        pytest.skip("openvino is not installed")
    p = subprocess.run(
        [sys.executable, "-c", _SIGNAL_STACK_CHILD, checkpoint], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0 and p.stdout.strip() == "alive", f"rc={p.returncode}: {p.stderr[-2000:]}"


def _npy_bytes(arrays: list) -> list[bytes]:
    return [Path(a.logits).read_bytes() + Path(a.probs).read_bytes() for a in arrays]


def test_score_dataset_matches_eager_and_resumes_only_missing_shards(tmp_path, small_set, checkpoint):
    from audit.zoo import build_model

    spec = resolve_model(checkpoint)
    ds = small_set
    st = ScoreStats()
    kw = {"batch_size": 3, "workers": 0, "shard_size": 6, "progress": False}
    (a,) = score_dataset(ds, [spec], tmp_path / "arr", stats=st, **kw)
    assert st.images == len(ds) and st.backend == resolve_backend("auto", "cpu")
    logits = np.load(a.logits)
    assert logits.shape == (len(ds), 1000) and np.isfinite(logits).all()
    probs = np.load(a.probs)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    model = build_model(spec)
    with torch.inference_mode():
        x = torch.stack([spec.preprocess.transform()(decode_image(ds.path(i))) for i in range(len(ds))])
        eager = model(x).numpy()
    np.testing.assert_allclose(logits, eager, atol=1e-3 * max(1.0, float(np.abs(eager).max())))
    before = _npy_bytes([a])

    shards = sorted((a.logits.parent / "shards").rglob("*.npz"))
    assert len(shards) == 4  # 20 images in shards of 6
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[2].unlink()
    st2 = ScoreStats()
    (b,) = score_dataset(ds, [spec], tmp_path / "arr", stats=st2, **kw)
    assert st2.images == 6, "only the missing shard is recomputed"
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != shards[2])
    assert _npy_bytes([b]) == before

    st3 = ScoreStats()
    score_dataset(ds, [spec], tmp_path / "arr", stats=st3, **kw)
    assert st3.images == 0 and st3.build == 0, "a finished workspace builds and scores nothing"


def test_changed_settings_recompute_instead_of_mixing(tmp_path, small_set, checkpoint):
    spec = resolve_model(checkpoint)
    kw = {"batch_size": 8, "workers": 0, "shard_size": 8, "progress": False}
    (a,) = score_dataset(small_set, [spec], tmp_path / "arr", backend="torch", **kw)
    manifest = json.loads((a.logits.parent / "shards").glob("*/manifest.json").__next__().read_text())
    st = ScoreStats()
    (b,) = score_dataset(small_set, [spec], tmp_path / "arr", backend="torch", precision="bf16", stats=st, **kw)
    assert st.images == len(small_set), "bf16 shards never reuse fp32 ones"
    manifest2 = json.loads((b.logits.parent / "shards").glob("*/manifest.json").__next__().read_text())
    assert manifest2["fingerprint"] != manifest["fingerprint"]
    assert np.isfinite(np.load(b.logits)).all()


def test_a_half_written_shard_left_by_a_kill_is_ignored(tmp_path, small_set, checkpoint):
    spec = resolve_model(checkpoint)
    kw = {"batch_size": 10, "workers": 0, "shard_size": 10, "progress": False, "backend": "torch"}
    score_dataset(small_set, [spec], tmp_path / "arr", **kw)
    d = next((tmp_path / "arr" / "shards").iterdir())
    (d / ".000001-abc.npz.tmp").write_bytes(b"PK\x03\x04 truncated")
    (d / "000001.npz").unlink()
    st = ScoreStats()
    score_dataset(small_set, [spec], tmp_path / "arr", stats=st, **kw)
    assert st.images == 10
    assert not list(d.glob(".*.tmp"))


def test_workers_give_the_same_bytes_as_loading_in_process(tmp_path, small_set, checkpoint):
    spec = resolve_model(checkpoint)
    kw = {"batch_size": 4, "shard_size": 8, "progress": False}
    (a,) = score_dataset(small_set, [spec], tmp_path / "w0", workers=0, **kw)
    (b,) = score_dataset(small_set, [spec], tmp_path / "w2", workers=2, **kw)
    assert _npy_bytes([a]) == _npy_bytes([b])


@pytest.mark.gpu
def test_cuda_runner_pinned_non_blocking_and_amp_agree(checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from audit.zoo import build_model

    spec = resolve_model(checkpoint)
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)).pin_memory()
    cpu = TorchRunner(build_model(spec), spec.preprocess, "cpu")(u8).numpy()
    gpu = TorchRunner(build_model(spec), spec.preprocess, "cuda")(u8).cpu().numpy()
    np.testing.assert_allclose(gpu, cpu, atol=1e-2 * max(1.0, float(np.abs(cpu).max())))
    for precision in ("fp16", "bf16"):
        amp = TorchRunner(build_model(spec), spec.preprocess, "cuda", precision=precision)(u8).cpu().numpy()
        assert amp.dtype == np.float32 and np.isfinite(amp).all()


def test_cached_shards_follow_the_weights_content_not_their_path(tmp_path, small_set):
    import shutil

    kw = {"batch_size": 8, "workers": 0, "shard_size": 8, "progress": False, "backend": "torch"}
    a, b = tmp_path / "a" / "m.pth", tmp_path / "b" / "m.pth"
    score_dataset(small_set, [resolve_model(make_checkpoint(a, seed=1))], tmp_path / "arr", **kw)
    b.parent.mkdir()

    # The same weights moved (another machine, another venv): nothing is rescored.
    shutil.copy(a, b)
    st = ScoreStats()
    score_dataset(small_set, [resolve_model(f"mobilenet_v3_small@{b}")], tmp_path / "arr", stats=st, **kw)
    assert st.images == 0

    # A checkpoint overwritten in place (a retrained best.pth): cached scores must not be reused.
    st = ScoreStats()
    score_dataset(small_set, [resolve_model(make_checkpoint(b, seed=2))], tmp_path / "arr", stats=st, **kw)
    assert st.images == len(small_set)

"""The backend registry and the use_backend switch."""
import pytest
import torch

import pangu_ops
from pangu_ops import backends

from conftest import REQUIRED_BACKENDS


@pytest.mark.parametrize("name", REQUIRED_BACKENDS)
def test_required_backends_load(name):
    assert backends.status()[name] is None


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert pangu_ops.current_backend() == "auto"
    with pangu_ops.use_backend("reference"):
        assert pangu_ops.current_backend() == "reference"
        with pangu_ops.use_backend("cpu"):
            assert pangu_ops.current_backend() == "cpu"
        assert pangu_ops.current_backend() == "reference"
    assert pangu_ops.current_backend() == "auto"


@pytest.mark.parametrize("read", ["os.environ's mapping", "os.environ.get"])
def test_env_var_sets_default(monkeypatch, read):
    """The variable as os.environ has it on every call, read from os.environ's own mapping (the
    fast read) or by os.environ.get (where os.environ is not built that way)."""
    if read == "os.environ.get":
        monkeypatch.setattr(backends, "_ENV_KEY", None)
    else:
        assert backends._ENV_KEY is not None  # CPython's os.environ: the fast read is the one taken
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert pangu_ops.current_backend() == "reference"
    assert backends.resolve(torch.device("cpu")).name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    assert backends.kernel("permute", torch.device("cpu")) is backends.load("cpu").permute
    monkeypatch.delenv(backends.ENV_VAR)
    assert pangu_ops.current_backend() == "auto"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="PANGU_OPS_BACKEND.*nonsense"):
        pangu_ops.current_backend()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with pangu_ops.use_backend("cuda"):
            pass


def test_auto_picks_native_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve(torch.device("cpu")).name == "cpu"
    assert backends.resolve(torch.device("cuda")).name == "triton"
    with pytest.raises(backends.BackendUnavailable, match="no backend for meta"):
        backends.resolve(torch.device("meta"))


def test_backend_refuses_foreign_device():
    with pangu_ops.use_backend("cpu"), pytest.raises(backends.BackendUnavailable, match="runs on cpu"):
        backends.resolve(torch.device("cuda"))


def test_backend_choice_reaches_the_kernel(monkeypatch):
    """The op really runs the chosen backend's kernel (not always the same one)."""
    calls = []
    real = backends.load

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backends, "load", spy)
    monkeypatch.setattr(backends, "_kernels", {})  # the per-call lookup cache
    x, ids = torch.randn(4, 8), torch.tensor([[0], [1], [0], [1]])
    for name in REQUIRED_BACKENDS:
        with pangu_ops.use_backend(name):
            pangu_ops.permute(x, ids, 2)
    assert calls == list(REQUIRED_BACKENDS)


def test_unavailable_backend_says_why():
    why = backends.status()["ascend"]
    assert why
    with pytest.raises(backends.BackendUnavailable, match="ascend|AscendC|torch_npu|issue"):
        backends.load("ascend")

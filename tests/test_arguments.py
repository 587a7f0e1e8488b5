"""Bad arguments and settings are InvalidArgumentError (an SllmStoreError, and a ValueError), in
the Python API and the environment alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sllm_store
from sllm_store.errors import InvalidArgumentError, SllmStoreError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return sllm_store.save_state_dict({"w": torch.randn(8, 8)}, tmp_path_factory.mktemp("a") / "m.sllm",
                                      quiet=True)


@pytest.mark.parametrize("kwargs", [
    {"io_mode": "bogus"}, {"chunk_size": "12 parsecs"}, {"chunk_size": 4097}, {"chunk_size": -4096},
    {"num_threads": 0}, {"chunk_size": "64KiB", "verify": True},
])
def test_load_arguments(checkpoint: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        sllm_store.load_state_dict(checkpoint, **kwargs)
    assert isinstance(e.value, SllmStoreError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("name,value", [
    ("SLLM_STORE_IO_MODE", "sideways"), ("SLLM_STORE_NUM_THREADS", "many"), ("SLLM_STORE_VERIFY", "perhaps"),
    ("SLLM_STORE_CHUNK_SIZE", "lots"), ("SLLM_STORE_TIMEOUT", "soon"), ("SLLM_STORE_REMOTE_GETS", "0"),
    ("SLLM_STORE_STAGING_BUFFERS", "0"),
])
def test_environment_settings(checkpoint: Path, monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgumentError, match=name):
        sllm_store.load_state_dict(checkpoint)


@pytest.mark.parametrize("kwargs", [{"dtype": "floaty"}, {"chunk_size": "1KiB"}, {"num_files": 0},
                                    {"compress": "lzma"}])
def test_save_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        sllm_store.save_state_dict({"w": torch.randn(2)}, tmp_path / "o.sllm", quiet=True, **kwargs)
    assert not (tmp_path / "o.sllm").exists()


def test_bad_values_raise_from_the_hierarchy(tmp_path: Path) -> None:
    """Values of the wrong kind get the library's errors, each naming what it got."""
    ck = sllm_store.save_state_dict({"w": torch.ones(2)}, tmp_path / "c.sllm", quiet=True)
    with pytest.raises(InvalidArgumentError, match="num_threads .* 'x'"):
        sllm_store.load_state_dict(ck, num_threads="x")
    with pytest.raises(sllm_store.UnknownNameError, match=r"not in the checkpoint: \['nope'\]") as e:
        sllm_store.load_state_dict(ck, {"nope": "cpu"})
    assert isinstance(e.value, KeyError) and isinstance(e.value, InvalidArgumentError)
    assert str(e.value).startswith("device map")  # the message as given, not quoted as KeyError's
    with pytest.raises(InvalidArgumentError, match="is a int, not a torch.Tensor"):
        sllm_store.save_state_dict({"w": torch.ones(2), "v": 3}, tmp_path / "a.sllm", quiet=True)
    with pytest.raises(InvalidArgumentError, match=r"keys are names \(str\), got 1 \(int\)"):
        sllm_store.save_state_dict({1: torch.ones(2)}, tmp_path / "b.sllm", quiet=True)
    with pytest.raises(InvalidArgumentError, match="meta device"):
        sllm_store.save_state_dict({"w": torch.empty(2, device="meta")}, tmp_path / "m.sllm", quiet=True)
    assert not any((tmp_path / n).exists() for n in ("a.sllm", "b.sllm", "m.sllm"))
    with pytest.raises(InvalidArgumentError, match="verify must be True, False or None, got 'maybe'"):
        sllm_store.load_state_dict(ck, verify="maybe")
    for path in (None, 123):
        with pytest.raises(InvalidArgumentError, match="path or URL"):
            sllm_store.load_state_dict(path)
        with pytest.raises(InvalidArgumentError, match="path or URL"):
            sllm_store.residency(path)
    with pytest.raises(InvalidArgumentError, match="copy must be True, False or None, got 'yes'"):
        sllm_store.load_state_dict(ck, copy="yes")
    with sllm_store.load_state_dict(ck, wait=False) as pending:
        with pytest.raises(InvalidArgumentError, match="tensor name or an iterable of them, got 123"):
            pending.wait(123)
        assert pending.wait("w") and pending.wait(["w"])


@pytest.mark.parametrize("api", ["sllm_store", "serverlessllm"])
def test_saving_a_plain_module_as_a_model_says_what_to_use(tmp_path: Path, api: str) -> None:
    import sllm_store.transformers as compatible

    save = sllm_store.save_model if api == "sllm_store" else compatible.save_model
    with pytest.raises(InvalidArgumentError, match="save_state_dict"):
        save(torch.nn.Linear(2, 2), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_class(checkpoint: Path) -> None:
    pytest.importorskip("transformers")
    (checkpoint / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}')
    with pytest.raises(InvalidArgumentError, match="NoSuchModelClass"):
        sllm_store.load_model(checkpoint, hf_model_class="NoSuchModelClass", device_map="cpu")


@pytest.mark.parametrize("blocked,code,extra", [
    ("grpc", "sllm_store.load_state_dict('m', store='unix:///nowhere.sock')", "server"),
    ("obstore", "sllm_store.load_state_dict('s3://bucket/m.sllm')", "remote"),
    ("obstore", "from sllm_store.remote.objects import upload; upload(sys.argv[1], 's3://bucket/m.sllm')",
     "remote"),
    ("zstandard", "sllm_store.save_state_dict({'w': torch.ones(2)}, sys.argv[1], compress='zstd')",
     "compress"),
    ("transformers", "sllm_store.load_model(sys.argv[1], device_map='cpu')", "transformers"),
    ("transformers", "import sllm_store.transformers as T; T.load_model(sys.argv[1])", "transformers"),
    ("vllm", "import sllm_store.vllm; sllm_store.vllm.save(sys.argv[1], sys.argv[1] + '.out')", "vllm"),
])
def test_missing_optional_package_names_its_extra(tmp_path: Path, blocked: str, code: str,
                                                  extra: str) -> None:
    import subprocess
    import sys
    import textwrap

    from _helpers import subprocess_env

    script = textwrap.dedent(f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if it were not installed
        import torch, sllm_store
        try:
            {code}
        except sllm_store.MissingDependencyError as e:
            assert isinstance(e, ImportError)
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.sllm")], capture_output=True,
                       text=True, timeout=120, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert f"pip install 'sllm-store[{extra}]'" in r.stdout and f"'.[{extra}]'" in r.stdout, r.stdout

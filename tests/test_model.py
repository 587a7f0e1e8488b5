"""load_model / save_model against transformers' from_pretrained (CPU; GPU variants in test_cuda)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import sllm_store

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _configs() -> dict[str, tuple[object, str]]:
    T = transformers
    return {
        "llama": (
            T.LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=256,
                tie_word_embeddings=True,
            ),
            "AutoModelForCausalLM",
        ),
        "gpt2": (
            T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
            "AutoModelForCausalLM",
        ),
        "opt": (
            T.OPTConfig(
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=256,
                max_position_embeddings=64,
                word_embed_proj_dim=64,
            ),
            "AutoModelForCausalLM",
        ),
        "bert": (
            T.BertConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=256,
                max_position_embeddings=64,
            ),
            "AutoModelForMaskedLM",
        ),
    }


@pytest.fixture(scope="module", params=list(_configs()))
def model_dirs(request, tmp_path_factory) -> tuple[str, Path, Path]:
    config, auto = _configs()[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(config)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "hf")
    sllm_store.convert(root / "hf", root / "sllm", quiet=True)
    return auto, root / "hf", root / "sllm"


def _outputs(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_model_matches_from_pretrained(model_dirs, dtype) -> None:
    auto, hf, converted = model_dirs
    ref = getattr(transformers, auto).from_pretrained(hf, dtype=dtype).eval()
    ours = sllm_store.load_model(converted, device_map="cpu", torch_dtype=dtype, hf_model_class=auto)
    assert not ours.training
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for k in ref_sd:
        assert ref_sd[k].dtype == our_sd[k].dtype, k
        assert torch.equal(ref_sd[k], our_sd[k]), k
    assert torch.equal(_outputs(ref), _outputs(ours))
    # No parameter or buffer is left on the meta device.
    assert not [n for n, p in ours.named_parameters() if p.is_meta]
    assert not [n for n, b in ours.named_buffers() if b.is_meta]
    # Tied input/output embeddings stay tied (same storage), as in from_pretrained.
    out_emb = ours.get_output_embeddings()
    if out_emb is not None and ref.get_output_embeddings().weight is ref.get_input_embeddings().weight:
        assert out_emb.weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()


def test_load_model_from_plain_safetensors_dir(model_dirs) -> None:
    auto, hf, _ = model_dirs
    ref = getattr(transformers, auto).from_pretrained(hf, dtype=torch.float32).eval()
    ours = sllm_store.load_model(hf, device_map="cpu", torch_dtype=torch.float32, hf_model_class=auto)
    assert torch.equal(_outputs(ref), _outputs(ours))


def test_save_model_round_trip(model_dirs, tmp_path) -> None:
    auto, _, converted = model_dirs
    model = sllm_store.load_model(converted, device_map="cpu", hf_model_class=auto)
    out = sllm_store.save_model(model, tmp_path / "saved", quiet=True)
    assert (out / "config.json").is_file()
    sllm_store.verify(out)
    again = sllm_store.load_model(out, device_map="cpu", hf_model_class=auto)
    assert torch.equal(_outputs(model), _outputs(again))
    with pytest.raises(sllm_store.DestinationExistsError):
        sllm_store.save_model(model, out)


def test_load_model_auto_device_map_on_cpu_only(model_dirs) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU fallback of device_map='auto'")
    auto, _, converted = model_dirs
    model = sllm_store.load_model(converted, hf_model_class=auto)  # device_map="auto"
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_load_model_dict_device_map_cpu(model_dirs) -> None:
    auto, hf, converted = model_dirs
    ref = getattr(transformers, auto).from_pretrained(hf, dtype=torch.float32).eval()
    model = sllm_store.load_model(
        converted, device_map={"": "cpu"}, torch_dtype=torch.float32, hf_model_class=auto
    )
    assert torch.equal(_outputs(ref), _outputs(model))


def test_load_model_missing_weights_is_an_error(tmp_path) -> None:
    config, auto = _configs()["llama"]
    model = getattr(transformers, auto).from_config(config)
    sd = {k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    sllm_store.save_state_dict(sd, tmp_path / "partial", quiet=True)
    config.save_pretrained(tmp_path / "partial")
    with pytest.raises(sllm_store.SllmStoreError, match="lacks weights"):
        sllm_store.load_model(tmp_path / "partial", device_map="cpu")


def test_import_is_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sllm_store; "
        "print(sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_local_load_imports_only_its_own_tier(tmp_path) -> None:
    """A fresh process's first local load pays for no other tier's imports: neither the store
    server's client (grpc, protobuf) nor the download machinery of the remote tier."""
    import subprocess
    import sys

    sllm_store.save_state_dict({"w": torch.arange(8.0)}, tmp_path / "m", quiet=True)
    code = (
        "import sys, sllm_store; "
        f"sllm_store.load_state_dict({str(tmp_path / 'm')!r}, 'cpu'); "
        "print(sorted(m for m in ('grpc', 'google.protobuf', 'sllm_store.remote', 'obstore') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory) -> tuple[Path, Path]:
    config, auto = _configs()["llama"]
    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(config)
    root = tmp_path_factory.mktemp("llama-extra")
    model.save_pretrained(root / "hf")
    sllm_store.convert(root / "hf", root / "sllm", quiet=True)
    return root / "hf", root / "sllm"


def test_concurrent_load_model_calls_do_not_disturb_each_other(llama_dirs) -> None:
    import threading

    hf, conv = llama_dirs
    ref = _outputs(transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32))
    results: list = [None] * 4
    errors: list = []

    def run(i: int) -> None:
        try:
            results[i] = _outputs(sllm_store.load_model(conv, device_map="cpu", torch_dtype=torch.float32))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for r in results:
        torch.testing.assert_close(r, ref)
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # no patch left behind
    assert torch.get_default_dtype() == torch.float32


def test_the_report_says_where_the_model_time_went(llama_dirs) -> None:
    """Beside the load's own figures, the report of a model load gives the time spent building
    the model, how long the loaded weights waited for it, and assembling the model from them; the
    load's time covers them all."""
    from sllm_store.model import load_model_with_report

    _, conv = llama_dirs
    _, report = load_model_with_report(conv, device_map="cpu")
    timings = report.stats["model"]
    assert set(timings) == {"build_s", "build_wait_s", "assemble_s"}, timings
    assert all(v >= 0 for v in timings.values()) and timings["build_s"] > 0, timings
    assert report.seconds >= timings["build_wait_s"] + timings["assemble_s"], (report.seconds, timings)


def test_the_model_is_built_once_the_loads_own_python_steps_are_done(llama_dirs, monkeypatch) -> None:
    """The build (Python, holding the GIL) starts as the bytes start to move, after the load has
    planned and taken its memory, so that it never holds up those steps; a load that fails before
    then starts no build."""
    import sllm_store.loader as loader

    _, conv = llama_dirs
    events: list[str] = []
    prepare, config = loader._prepare, transformers.AutoConfig.from_pretrained

    def recording_prepare(*a, **k):
        out = prepare(*a, **k)
        events.append("prepared")
        return out

    def recording_config(*a, **k):  # the build's first step
        events.append("build")
        return config(*a, **k)

    monkeypatch.setattr(loader, "_prepare", recording_prepare)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording_config)
    sllm_store.load_model(conv, device_map="cpu")
    assert events == ["prepared", "build"], events

    def failing_prepare(*a, **k):
        raise sllm_store.SllmStoreError("no memory for the load")

    events.clear()
    monkeypatch.setattr(loader, "_prepare", failing_prepare)
    with pytest.raises(sllm_store.SllmStoreError, match="no memory"):
        sllm_store.load_model(conv, device_map="cpu")
    assert events == [], events


def test_dtype_argument_and_config_dtype(llama_dirs, tmp_path) -> None:
    import json
    import shutil

    _, conv = llama_dirs
    model = sllm_store.load_model(conv, device_map="cpu", dtype=torch.bfloat16)  # the transformers 5 name
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        sllm_store.load_model(conv, device_map="cpu", dtype=torch.bfloat16, torch_dtype=torch.float16)
    shutil.copytree(conv, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["dtype"] = "bfloat16"  # fp32 weights, config says bf16: "auto" follows the config
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = sllm_store.load_model(tmp_path / "m", device_map=None)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("var, value, message", [
    ("SLLM_STORE_NUM_THREADS", "abc", "SLLM_STORE_NUM_THREADS must be an integer"),
    ("SLLM_STORE_VERIFY", "maybe", "SLLM_STORE_VERIFY must be"),
    ("SLLM_STORE_CHUNK_SIZE", "16M", "use KiB/MiB/GiB"),
    ("SLLM_STORE_STAGING_BUFFERS", "two", "SLLM_STORE_STAGING_BUFFERS must be an integer"),
])
def test_bad_environment_values_name_the_variable(monkeypatch, var, value, message) -> None:
    from sllm_store.config import LoadConfig

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        LoadConfig.resolve()


def test_environment_values_are_case_insensitive(monkeypatch) -> None:
    from sllm_store.config import LoadConfig

    monkeypatch.setenv("SLLM_STORE_IO_MODE", "Direct")
    monkeypatch.setenv("SLLM_STORE_VERIFY", "ON")
    cfg = LoadConfig.resolve()
    assert cfg.io_mode == "direct" and cfg.verify is True


def test_cast_load_frees_the_loaded_block(llama_dirs, tmp_path) -> None:
    """A bf16 checkpoint loaded as float32: the cast weights are new tensors, and the few
    uncast ones are copied out too, so no parameter keeps the whole bf16 block alive."""
    import shutil

    hf, conv = llama_dirs
    sd = sllm_store.load_state_dict(conv)
    mixed = {k: (v if "norm" in k else v.to(torch.bfloat16)) for k, v in sd.items()}  # fp32 norms
    path = sllm_store.save_state_dict(mixed, tmp_path / "mixed")
    shutil.copy(conv / "config.json", path / "config.json")
    model = sllm_store.load_model(path, device_map="cpu", torch_dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in mixed.items()}, strict=False)
    torch.testing.assert_close(_outputs(model), _outputs(ref))
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.untyped_storage().nbytes() == p.nbytes, name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_default_class_is_the_architecture_the_config_names(tmp_path):
    """Without hf_model_class, load_model builds the class config.json's ``architectures`` names
    (a masked-language BERT here, which AutoModelForCausalLM would not load), not a causal LM."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    ref = transformers.BertForMaskedLM(config).eval()
    ref.save_pretrained(tmp_path / "bert")
    sllm_store.convert(tmp_path / "bert", tmp_path / "bert.sllm", quiet=True)
    model = sllm_store.load_model(tmp_path / "bert.sllm", device_map="cpu")
    assert type(model).__name__ == "BertForMaskedLM"
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    with pytest.raises(sllm_store.SllmStoreError, match="hf_model_class"):
        sllm_store.load_model(tmp_path / "bert.sllm", device_map="cpu", hf_model_class="GPT2LMHeadModel")


def test_parameters_storage_is_never_made_while_building(tmp_path) -> None:
    """The build makes parameters' storage on the meta device (torch.empty without a device, on
    the building thread only); values computed at construction stay real."""
    import threading

    from sllm_store.building import _EmptyOnMeta

    seen: dict[str, torch.device] = {}
    with _EmptyOnMeta():
        seen["empty"] = torch.empty(3).device
        seen["explicit"] = torch.empty(3, device="cpu").device
        seen["arange"] = torch.arange(3).device
        other = threading.Thread(target=lambda: seen.setdefault("other thread", torch.empty(3).device))
        other.start()
        other.join()
    assert seen == {"empty": torch.device("meta"), "explicit": torch.device("cpu"),
                    "arange": torch.device("cpu"), "other thread": torch.device("cpu")}


def test_a_buffer_made_with_empty_is_built_with_real_storage(tmp_path) -> None:
    """A model that fills a buffer made by torch.empty is built again with real storage: the
    buffer holds its value, never a meta tensor."""

    class FilledBufferLlama(transformers.LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("scale", torch.empty(4).fill_(2.0), persistent=False)

    config, _ = _configs()["llama"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    sllm_store.convert(tmp_path / "hf", tmp_path / "sllm", quiet=True)
    model = sllm_store.load_model(tmp_path / "sllm", device_map="cpu", hf_model_class=FilledBufferLlama)
    assert model.scale.device.type == "cpu" and torch.equal(model.scale, torch.full((4,), 2.0))
    assert not any(p.is_meta for p in model.parameters())
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(_outputs(model), _outputs(ref))

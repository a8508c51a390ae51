"""Hugging Face export and import, and checkpoint inspection.

Export: tiny llama and gpt2 checkpoints (tied and untied) become HF directories that
`transformers` loads; the logits match megalite's in fp32, and the converted tokenizer
gives megalite's ids on real files (stdlib sources with unicode, a shell script with
tabs). Import: an HF Llama with its own byte-level tokenizer becomes a checkpoint with
the same logits, whose tokenizer prepares data, which a Trainer resumes from, and
which exports back to the same HF model.
Inspect: a good checkpoint verifies; a corrupted, truncated or missing file exits 2.
"""

import importlib.util
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from megalite.parallel import fused
from megalite.checkpoint import format as ckpt
from megalite.hf import importer as hf_import
from megalite.cli import parse_args
from megalite.config import Config, ModelConfig, resolve
from megalite.data.corpus import stdlib_files, stdlib_root
from megalite.data.prepare import prepare
from megalite.data.tokenizer import Tokenizer, train_tokenizer
from megalite.errors import CheckpointError
from megalite.hf.export import export_hf
from megalite.hf.importer import import_hf
from megalite.model.init import init_parameters
from megalite.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent
VOCAB = 384


def real_files() -> list[Path]:
    """Sources with indentation and docstrings, Latin-1 / CJK / astral characters, and a
    shell script indented with tabs (the stdlib's .py files have none)."""
    root = stdlib_root()
    names = ["textwrap.py", "shlex.py", "re/_casefix.py", "test/test_unicode_identifiers.py"]
    files = [root / n for n in names] + [Path(sysconfig.get_config_var("LIBPL") or "", "makesetup")]
    found = [f for f in files if f.is_file()]
    assert len(found) >= 3, files
    return found


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(stdlib_files(200_000), path, VOCAB)


def model_cfg(preset, **fields) -> ModelConfig:
    model = dict(preset=preset, hidden_size=32, num_layers=2, num_heads=4, vocab_size=VOCAB,
                 max_seq_len=16, attention="sdpa", kernels="torch", init_std=0.2)
    model.update(fields)
    return resolve(Config(model=ModelConfig(**model)), VOCAB, "cpu").model


def random_model(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    init_parameters(model, seed=3, std=cfg.init_std)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms and biases too, so a swapped mapping shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.1)
    return model.eval()


def save(model, root, tokenizer, step=5) -> Path:
    cfg = Config(model=model.cfg)
    cfg.train.seq_len = model.cfg.max_seq_len
    tensors = {n: t.clone() for n, t in fused.stored_tensors(model.named_parameters()).items()}
    meta = {"config": cfg.to_dict(), "tokenizer": str(tokenizer), "consumed_samples": 0,
            "loss": 2.5, "layout": {"tp": 1, "pp": 1}}
    return ckpt.save_checkpoint(root, step, {"model.safetensors": tensors}, meta, keep=1)


def tokens(seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def assert_logits_equal(ours, theirs):
    scale = theirs.abs().max()
    diff = (ours - theirs).abs().max()
    print(f"max |logit diff| {diff:.3g}, relative to max |logit| {diff / scale:.3g}")
    assert diff <= 1e-5 * scale


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("preset,fields", [
    ("llama", dict(num_kv_heads=2, rope_theta=500000.0)),  # untied, GQA
    ("llama", dict(tie_embeddings=True)),
    ("gpt2", dict()),  # tied
    ("gpt2", dict(tie_embeddings=False, attention="eager")),
])
def test_export_logits_match_transformers(preset, fields, sp_model, tmp_path):
    model = random_model(model_cfg(preset, **fields))
    save(model, tmp_path / "run" / "checkpoints", sp_model)
    out = export_hf(tmp_path / "run", tmp_path / "hf")  # a run directory: its latest
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert type(hf).__name__ == ("LlamaForCausalLM" if preset == "llama" else "GPT2LMHeadModel")
    with torch.no_grad():
        assert_logits_equal(model(tokens()), hf.eval()(tokens()).logits)


def test_exported_tokenizer_gives_megalite_ids_on_real_files(sp_model, tmp_path):
    save(random_model(model_cfg("llama")), tmp_path / "ckpt", sp_model)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ours, exported = Tokenizer(sp_model), Tokenizer(out / "tokenizer.json")
    for path in real_files():
        text = path.read_bytes().decode("utf-8")
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, path  # no BOS/EOS added, like megalite
        assert exported.encode(text) == ids, path
        assert hf.decode(ids) == ours.decode(ids) == text, path
    # Special-token text in a file is text, as sentencepiece has it, not a control token.
    text = "if '<s>' in x: return '</s>'\t# <unk>\n"
    assert hf(text)["input_ids"] == ours.encode(text)
    assert (hf.eos_token_id, hf.bos_token_id) == (ours.eos_id, ours.bos_id)
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (ours.eos_id, ours.bos_id)


def test_export_dtype_and_errors(sp_model, tmp_path):
    path = save(random_model(model_cfg("llama")), tmp_path / "ckpt", sp_model)
    out = export_hf(path, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="not an empty directory"):
        export_hf(path, tmp_path / "bf16")
    index = json.loads((path / "index.json").read_text())
    index["tokenizer"] = str(tmp_path / "moved.model")
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="--tokenizer"):
        export_hf(path, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing half-written is left behind
    export_hf(path, tmp_path / "y", tokenizer=sp_model)
    (path / "model.safetensors").write_bytes(b"\0" * (path / "model.safetensors").stat().st_size)
    with pytest.raises(CheckpointError, match="sha256"):
        export_hf(path, tmp_path / "z")


# ---------------------------------------------------------------- import

def byte_level_tokenizer(hf_dir: Path) -> None:
    """A Llama-3-style tokenizer trained here: byte-level BPE, BOS added on encode."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    texts = [p.read_bytes().decode("utf-8", "replace") for p in stdlib_files(200_000)]
    tok.train_from_iterator(texts, BpeTrainer(vocab_size=500, special_tokens=specials,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[(specials[0], tok.token_to_id(specials[0]))])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0],
                                         eos_token=specials[1]).save_pretrained(hf_dir)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf_llama")
    byte_level_tokenizer(hf_dir)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=20000.0, rms_norm_eps=1e-5, initializer_range=0.2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    return hf_dir


@pytest.fixture(scope="module")
def imported(hf_llama, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # several optimizer files, as a large model has
        patch.setattr(hf_import, "OPTIM_FILE_BYTES", 40_000)
        return import_hf(hf_llama, tmp_path_factory.mktemp("imp") / "llama")


def test_import_llama_logits_and_tokenizer(hf_llama, imported):
    index = ckpt.read_index(imported)
    cfg = parse_args([str(imported.parent / "config.yaml")])[0]
    resolve(cfg, 512, "cpu")
    model = Transformer(cfg.model).eval()
    with torch.no_grad():
        stored = ckpt.read_model_tensors(imported)
        for name, p in model.named_parameters():
            p.copy_(fused.joined(name, p, stored))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32,
                                                           attn_implementation="eager")
    with torch.no_grad():
        assert_logits_equal(model(tokens(vocab=512)), hf.eval()(tokens(vocab=512)).logits)
    assert index["step"] == 0 and index["config"]["model"]["rope_theta"] == 20000.0
    ours = Tokenizer(index["tokenizer"])
    theirs = transformers.AutoTokenizer.from_pretrained(hf_llama)
    assert ours.eos_id == theirs.eos_token_id and ours.vocab_size == 500
    for path in real_files():
        text = path.read_bytes().decode("utf-8")
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], path
        assert ours.decode(ids) == text


def test_imported_llama_exports_back(hf_llama, imported, tmp_path):
    out = export_hf(imported, tmp_path / "hf")
    load = transformers.AutoModelForCausalLM.from_pretrained
    original = load(hf_llama, dtype=torch.float32, attn_implementation="eager").eval()
    back = load(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(back(tokens(vocab=512)).logits, original(tokens(vocab=512)).logits)
    theirs, ours = (transformers.AutoTokenizer.from_pretrained(d) for d in (hf_llama, out))
    for path in real_files():
        text = path.read_bytes().decode("utf-8")
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], path  # BOS included


def test_imported_checkpoint_prepares_data_and_resumes_training(imported, tmp_path):
    out = imported.parent
    tokenizer = out / "tokenizer" / "tokenizer.json"
    summary = prepare(stdlib_files(60_000), tokenizer, tmp_path / "d", workers=1)
    assert summary["vocab_size"] == 500 and summary["eos_id"] == Tokenizer(tokenizer).eos_id
    from megalite.training.trainer import Trainer

    cfg, _ = parse_args([str(out / "config.yaml"), f"--data.paths=[{tmp_path / 'd'}]",
                         "--train.seq_len=32", "--train.micro_batch_size=2",
                         "--train.global_batch_size=2", "--train.steps=2",
                         "--train.eval_every=0", "--optim.warmup_steps=1",
                         f"--run.dir={tmp_path / 'run'}"])
    assert len(list(imported.glob("optim-*.safetensors"))) > 1
    trainer = Trainer(cfg, resume=str(out))
    stored = ckpt.read_model_tensors(imported)
    assert trainer.step == 0 and trainer.optimizer.step_count == 0
    for name, p in fused.stored_tensors(trainer.model.named_parameters()).items():
        assert torch.equal(p, stored[name]), name
    assert trainer.train() == 0 and trainer.step == 2
    assert torch.isfinite(torch.tensor(trainer.last_loss))


def test_gpt2_round_trip_and_import_errors(sp_model, tmp_path):
    model = random_model(model_cfg("gpt2"))
    save(model, tmp_path / "ckpt", sp_model)
    step_dir = import_hf(export_hf(tmp_path / "ckpt", tmp_path / "hf"), tmp_path / "back",
                         weights_only=True)
    stored = ckpt.read_model_tensors(step_dir)
    for name, p in fused.stored_tensors(model.named_parameters()).items():
        assert torch.equal(stored[name], p), name
    assert not ckpt.CheckpointReader(step_dir).names("optim")
    assert Tokenizer(ckpt.read_index(step_dir)["tokenizer"]).encode("x  = 1\n") == \
        Tokenizer(sp_model).encode("x  = 1\n")
    hf_dir = tmp_path / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="'mistral' cannot be imported"):
        import_hf(hf_dir, tmp_path / "bad")
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        import_hf(hf_dir, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- inspect

@pytest.mark.parametrize("damage,status,message", [
    (None, "sha256 OK", None),
    ("corrupt", "sha256 FAILED", "fails its sha256 check"),
    ("truncate", "TRUNCATED (", "truncated or damaged"),
    ("delete", "MISSING", "is missing"),
])
def test_inspect_ckpt(damage, status, message, sp_model, tmp_path, capsys):
    path = save(random_model(model_cfg("llama")), tmp_path / "ckpt", sp_model)
    weights = path / "model.safetensors"
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "delete":
        weights.unlink()
    tool = load_tool("inspect_ckpt")
    assert tool.run_main(tool.inspect_main, [str(tmp_path / "ckpt")]) == (2 if damage else 0)
    out, err = capsys.readouterr()
    assert "step: 5" in out and "loss: 2.5000" in out and "model: llama" in out
    assert "tensors: 21 (model 21)" in out and "tp=1" in out
    assert "model.safetensors" in out and status in out
    if damage:
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    else:
        assert "checksums: all files OK" in out and not err


def test_inspect_ckpt_without_index(tmp_path, capsys):
    (tmp_path / "step_0000001").mkdir()
    tool = load_tool("inspect_ckpt")
    assert tool.run_main(tool.inspect_main, [str(tmp_path / "step_0000001")]) == 2
    assert "index.json' is missing" in capsys.readouterr().err
    assert tool.run_main(tool.inspect_main, [str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err

"""The activation harvest: exactness, exclusions, checksums, resume and corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saeguard.activations import ActivationCache, ExclusionRules
from saeguard.errors import ConfigError, CorruptFileError, SaeguardError
from saeguard.jobs.harvest import HarvestConfig, harvest
from saeguard.models import load_model


def _cfg(model_dir: Path, corpus: Path, out: Path, **kw: object) -> HarvestConfig:
    base: dict[str, object] = {
        "model": str(model_dir),
        "hooks": ["resid_post.1", "mlp_out.2"],
        "corpus": str(corpus),
        "split": "all",
        "ctx_len": 16,
        "batch_size": 4,
        "shard_tokens": 16 * 6,
        "tokens": 500,
        "calibration_contexts": 4,
        "out": str(out),
    }
    base.update(kw)
    return HarvestConfig(**base)  # type: ignore[arg-type]


def _checksums(directory: Path) -> dict[str, str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {e["file"]: e["sha256"] for e in manifest["shards"]}


def test_harvest_matches_full_forward(tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path):
    cache = harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c"))
    assert cache.complete
    assert cache.n_tokens("resid_post.1") == 500 and cache.n_tokens("mlp_out.2") == 500
    loaded = load_model(str(tiny_llama_dir))
    tokens = cache.tokens()
    acts, index = cache.load("resid_post.1")
    with torch.inference_mode():
        hidden = loaded.model(input_ids=tokens, output_hidden_states=True).hidden_states[2]
    ctx, pos = index // 16, index % 16
    torch.testing.assert_close(acts, hidden[ctx, pos], atol=1e-4, rtol=0)
    # No special token position is ever kept, and position 0 (the start token) never is.
    special = torch.tensor(loaded.special_token_ids())
    assert not torch.isin(tokens[ctx, pos], special).any()
    assert (pos > 0).all()
    manifest = cache.manifest
    assert manifest["model"] == str(tiny_llama_dir) and manifest["corpus"] == str(text_corpus)
    assert set(manifest["hooks"]) == {"resid_post.1", "mlp_out.2"}
    assert all(len(e["sha256"]) == 64 for e in manifest["shards"])


def test_manifest_validates_against_its_schema(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    import jsonschema

    from saeguard.activations.cache import MANIFEST_SCHEMA

    schema = json.loads(MANIFEST_SCHEMA.read_text())
    harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c"))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    jsonschema.validate(manifest, schema)
    manifest["shards"][0]["sha256"] = "not-a-digest"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, schema)


def test_outlier_rule_drops_high_norm_rows() -> None:
    rules = ExclusionRules(special_ids=[0], outlier_multiple=10.0, median_norms={"h": 2.0})
    tokens = torch.tensor([[0, 5, 6, 7]])
    acts = torch.zeros(1, 4, 3)
    acts[0, :, 0] = torch.tensor([1.0, 19.0, 21.0, 2.0])  # norms 1, 19, 21, 2; threshold 20
    keep = rules.keep_mask(tokens, acts, "h")
    assert keep.tolist() == [[False, True, False, True]]
    off = ExclusionRules(exclude_special=False, special_ids=[0], outlier_multiple=0)
    assert off.keep_mask(tokens, acts, "h").all()


def test_resume_after_crash_gives_identical_checksums(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    reference = harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "ref"))
    assert len(reference.shards) >= 4

    class Crash(Exception):
        pass

    def crash_after_second(shard: int) -> None:
        if shard == 1:
            raise Crash

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        harvest(_cfg(tiny_llama_dir, text_corpus, out), after_shard=crash_after_second)
    assert len(_checksums(out)) == 2 and not ActivationCache.open(out).complete
    (out / ".shard_00002.safetensors.abc.tmp").write_bytes(b"half-written")  # crash leftovers
    resumed_shards: list[int] = []
    harvest(_cfg(tiny_llama_dir, text_corpus, out), after_shard=resumed_shards.append)
    assert resumed_shards[0] == 2  # the finished shards were not recomputed
    assert _checksums(out) == _checksums(tmp_path / "ref")
    assert not list(out.glob(".*.tmp"))


def test_corrupt_shard_is_named_with_the_fix(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_llama_dir, text_corpus, tmp_path / "c")
    harvest(cfg)
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = ActivationCache.open(tmp_path / "c")
    with pytest.raises(CorruptFileError, match="shard_00001.safetensors") as info:
        cache.load("resid_post.1")
    assert "delete" in str(info.value) and "re-run" in str(info.value)
    with pytest.raises(CorruptFileError, match="shard_00001.safetensors"):
        cache.verify()
    # The documented fix works: delete the shard, run the same harvest, get the same cache.
    before = _checksums(tmp_path / "c")
    shard.unlink()
    recomputed: list[int] = []
    harvest(cfg, after_shard=recomputed.append)
    assert recomputed == [1]
    assert _checksums(tmp_path / "c") == before
    ActivationCache.open(tmp_path / "c").verify()


def test_corrupt_manifest_and_foreign_directories(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_llama_dir, text_corpus, tmp_path / "c")
    harvest(cfg)
    (tmp_path / "c" / "manifest.json").write_text("{ truncated")
    with pytest.raises(CorruptFileError, match="manifest.json is not valid JSON.*move the folder"):
        ActivationCache.open(tmp_path / "c")
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(SaeguardError, match="not an activation cache"):
        harvest(_cfg(tiny_llama_dir, text_corpus, other))
    assert (other / "precious.txt").read_text() == "keep me"


def test_changed_arguments_refuse_unless_overwrite(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c"))
    with pytest.raises(SaeguardError, match="differs in: tokens"):
        harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c", tokens=300))
    cache = harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c", tokens=300, overwrite=True))
    assert cache.n_tokens("resid_post.1") == 300
    # A finished cache is returned as is, without recomputing anything.
    calls: list[int] = []
    harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c", tokens=300), after_shard=calls.append)
    assert calls == []


def test_corpus_too_small_without_repeat(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    with pytest.raises(SaeguardError, match="ran out"):
        harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c", tokens=10**6, repeat=False))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tokens": 0}, "--tokens must be positive"),
        ({"outlier_multiple": 0.5}, "--outlier-multiple"),
        ({"batch_size": 0}, "--batch-size"),
        ({"hooks": []}, "at least one hook"),
        ({"shard_tokens": 4}, "--shard-tokens"),
        ({"hooks": ["resid_post.1", "resid_post.1"]}, "repeated"),
    ],
)
def test_impossible_configs_fail_early(override: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"out": "x", **override}
    with pytest.raises(ConfigError, match=message):
        HarvestConfig(**base)  # type: ignore[arg-type]


def test_unknown_hook_fails_before_work(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    with pytest.raises(SaeguardError, match="unknown hook point 'resid_post.9'"):
        harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "c", hooks=["resid_post.9"]))
    assert not (tmp_path / "c").exists()


def test_crash_while_writing_the_first_manifest_is_resumable(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / ".manifest.json.x1y2.tmp").write_text('{"half": ')  # killed before the rename
    cache = harvest(_cfg(tiny_llama_dir, text_corpus, out))
    assert cache.complete and not list(out.glob(".*.tmp"))


def test_overwrite_checks_first_and_deletes_only_cache_files(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    harvest(_cfg(tiny_llama_dir, text_corpus, out))
    (out / "notes.txt").write_text("mine")
    before = _checksums(out)
    bad = _cfg(tiny_llama_dir, text_corpus, out, hooks=["resid_post.9"], overwrite=True)
    with pytest.raises(SaeguardError, match="unknown hook point"):
        harvest(bad)
    assert _checksums(out) == before  # the good cache survived the failed overwrite
    harvest(_cfg(tiny_llama_dir, text_corpus, out, tokens=200, overwrite=True))
    assert ActivationCache.open(out).n_tokens("resid_post.1") == 200
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list(out.glob("shard_*.safetensors"))) == len(ActivationCache.open(out).shards)


def test_changed_corpus_between_crash_and_resume_is_refused(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"

    def crash(shard: int) -> None:
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        harvest(_cfg(tiny_llama_dir, text_corpus, out), after_shard=crash)
    text_corpus.write_text(text_corpus.read_text().replace("river", "ocean"))
    with pytest.raises(SaeguardError, match="corpus_sha256.*would mix"):
        harvest(_cfg(tiny_llama_dir, text_corpus, out))
    cache = harvest(_cfg(tiny_llama_dir, text_corpus, out, overwrite=True))
    assert cache.complete


def test_out_is_a_file_or_locked(tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SaeguardError, match="is an existing file"):
        harvest(_cfg(tiny_llama_dir, text_corpus, a_file))
    import fcntl

    out = tmp_path / "c"
    out.mkdir()
    with open(out / ".saeguard.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        with pytest.raises(SaeguardError, match="another saeguard process is writing"):
            harvest(_cfg(tiny_llama_dir, text_corpus, out))
    assert harvest(_cfg(tiny_llama_dir, text_corpus, out)).complete


def test_invalid_choices_through_the_python_api() -> None:
    with pytest.raises(ConfigError, match="--cache-dtype must be one of"):
        HarvestConfig(out="x", cache_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--split must be one of"):
        HarvestConfig(out="x", split="dev")  # type: ignore[arg-type]


def test_masked_harvest_records_settings_and_fraction(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    cache = harvest(_cfg(tiny_llama_dir, text_corpus, tmp_path / "m", mask_prob=0.2))
    masking = cache.manifest["masking"]
    assert masking["mask_prob"] == 0.2 and masking["mask_token"] == "<mask>"
    assert 0.15 < masking["masked_fraction"] < 0.25
    tokens = cache.tokens()
    _, index = cache.load("resid_post.1")
    assert not (tokens.reshape(-1)[index] == masking["mask_token_id"]).any()  # stored: originals


@pytest.mark.parametrize("planted", ["../victim.txt", "ABSOLUTE"])
def test_a_tampered_manifest_cannot_make_overwrite_touch_files_outside_out(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path, planted: str
) -> None:
    """Issue 13, case 2: a shared cache whose manifest names ``../victim.txt`` (or an absolute
    path) as a shard must not make ``--overwrite`` (or the checksum pass) touch that file."""
    out = tmp_path / "cache"
    harvest(_cfg(tiny_llama_dir, text_corpus, out, tokens=200))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["file"] = str(victim) if planted == "ABSOLUTE" else planted
    (out / "manifest.json").write_text(json.dumps(manifest))
    for cfg in (_cfg(tiny_llama_dir, text_corpus, out, tokens=300, overwrite=True),
                _cfg(tiny_llama_dir, text_corpus, out, tokens=200)):  # fmt: skip
        with pytest.raises(CorruptFileError, match=r"shards/0/file.*harvest again"):
            harvest(cfg)
    with pytest.raises(CorruptFileError, match="shards/0/file"):
        ActivationCache.open(out)
    assert victim.read_text(encoding="utf-8") == "precious"


def test_rerunning_a_complete_harvest_names_a_corrupt_shard_and_hashes_once(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13, case 5: re-running a harvest on a complete cache said complete without checking
    the shards; now sizes and checksums are checked, and each shard is hashed once per process
    while it is unchanged (a training run cycling over the cache does not re-hash every pass)."""
    import saeguard.activations.cache as cache_module

    cfg = _cfg(tiny_llama_dir, text_corpus, tmp_path / "c")
    harvest(cfg)
    hashed: list[str] = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    cache = harvest(cfg)  # complete: verified, nothing recomputed
    n_shards = len(cache.shards)
    cache.verify()
    list(cache.iter_shards("resid_post.1"))
    assert sorted(hashed) == sorted({e["file"] for e in cache.shards}) and n_shards >= 2
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))  # same size, new mtime: hashed again, mismatch named
    with pytest.raises(CorruptFileError, match=r"shard_00001\.safetensors.*SHA-256"):
        harvest(cfg)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CorruptFileError, match=r"shard_00001\.safetensors.*bytes where"):
        list(ActivationCache.open(tmp_path / "c").iter_shards("resid_post.1"))

"""`streamsvd profile`: spectra as `run` computes them, sensitivity as dense autograd computes it, identity checked."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamsvd.errors import StreamSVDError
from streamsvd.io.calibration import default_text, sample_windows
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.profile import PROFILE_JSON, ProfileConfig, make_profile, read_profile
from tiny_models import make_tiny_checkpoint

SAMPLES, SEQLEN, KEEP = 6, 48, 4


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def tiny(request, tmp_path_factory):
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "model")


def _profile(model_dir, path, **kw):
    kw = {"calib_samples": SAMPLES, "seqlen": SEQLEN, "sensitivity_samples": KEEP, "progress": False, **kw}
    return make_profile(ProfileConfig(model_dir, path, **kw))


def dense_sensitivity(model_dir, windows):
    """Mean squared gradient of the summed next-token NLL at every linear's output, the whole model in memory."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    outputs = {}
    for i, layer in enumerate(model.model.layers):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                def hook(module, inputs, output, key=f"model.layers.{i}.{name}"):
                    output.retain_grad()
                    outputs[key] = output
                m.register_forward_hook(hook)
    embeds = model.get_input_embeddings()(windows).detach().requires_grad_(True)  # so the graph reaches every layer
    logits = model(inputs_embeds=embeds).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    return {k: float(v.grad.double().pow(2).mean()) for k, v in outputs.items()}


def test_sensitivity_matches_dense_autograd(tiny, tmp_path):
    profile = _profile(tiny, tmp_path / "prof")
    windows = sample_windows(AutoTokenizer.from_pretrained(tiny), default_text(), SAMPLES, SEQLEN, seed=0)[:KEEP]
    want = dense_sensitivity(tiny, windows)
    got = profile.meta["sensitivity"]
    assert set(got) == set(want) == set(profile.meta["order"])
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-4), name
    assert profile.timing["sensitivity_seconds"] >= 0 and profile.meta["sensitivity_samples"] == KEEP


def test_the_head_gradient_taken_a_chunk_of_positions_at_a_time_is_the_whole_windows(tiny, tmp_path, monkeypatch):
    """The head's gradient goes LOGIT_CHUNK positions at a time (a 128k vocabulary's logits for a whole window
    would be a gigabyte): with chunks of 7 of the 47 scored positions (a short last one), the weights still match
    dense autograd, and equal the one-chunk profile's to round-off."""
    import streamsvd.job.profile as profile_module

    whole = _profile(tiny, tmp_path / "whole").meta["sensitivity"]
    monkeypatch.setattr(profile_module, "LOGIT_CHUNK", 7)
    chunked = _profile(tiny, tmp_path / "chunked").meta["sensitivity"]
    windows = sample_windows(AutoTokenizer.from_pretrained(tiny), default_text(), SAMPLES, SEQLEN, seed=0)[:KEEP]
    want = dense_sensitivity(tiny, windows)
    for name in want:
        assert chunked[name] == pytest.approx(want[name], rel=1e-4), name
        assert chunked[name] == pytest.approx(whole[name], rel=1e-6), name


def test_weighted_energies_match_dense_autograd(tiny, tmp_path):
    """Per direction j of the job's truncation: E_t[w_t (u_j . W x_t)^2] over the sensitivity windows' tokens, with w_t
    the token's mean squared gradient at the linear's output, as the whole model in memory computes it."""
    profile = _profile(tiny, tmp_path / "prof")
    windows = sample_windows(AutoTokenizer.from_pretrained(tiny), default_text(), SAMPLES, SEQLEN, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    model.requires_grad_(False)
    linears = {f"model.layers.{i}.{n}": m for i, layer in enumerate(model.model.layers)
               for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    inputs, outputs = {}, {}
    for key, m in linears.items():
        def hook(module, args, output, key=key):
            inputs.setdefault(key, []).append(args[0].detach().double())
            if output.requires_grad:
                output.retain_grad()
                outputs[key] = output
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(windows)  # every calibration window: the Grams the directions come from
    grams = {k: torch.cat(v).reshape(-1, v[0].shape[-1]) for k, v in inputs.items()}
    inputs.clear()
    keep = windows[:KEEP]
    embeds = model.get_input_embeddings()(keep).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[:, :-1]
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), keep[:, 1:].reshape(-1), reduction="sum").backward()
    assert profile.weighted is not None and set(profile.weighted) == set(linears)
    for key, m in linears.items():
        x = grams[key]
        w = m.weight.double()
        evals, q = torch.linalg.eigh(x.T @ x / x.shape[0])
        u, s, _ = torch.linalg.svd(w @ (q * evals.clamp_min(0).sqrt()), full_matrices=False)
        xk = inputs[key][0].reshape(-1, w.shape[1])
        tw = outputs[key].grad.double().pow(2).mean(-1).reshape(-1)  # each token's mean squared gradient
        want = (tw[:, None] * (xk @ w.T @ u).pow(2)).mean(0).numpy()
        got = profile.weighted[key]
        assert got.shape == want.shape and np.all(got >= -1e-12)
        # basis-free: their sum is E_t[w_t ||W x_t||^2]; then the loss at every rank (directions agree up to sign)
        assert got.sum() == pytest.approx(want.sum(), rel=1e-4), key
        np.testing.assert_allclose(np.cumsum(got), np.cumsum(want), rtol=2e-3, atol=1e-6 * want.sum(), err_msg=key)
    mats = {a.name: a for a in profile.matrices()}
    a = mats[next(iter(linears))]
    assert a.loss(0) == pytest.approx(float(profile.weighted[a.name].sum())) and a.loss(a.full) == 0.0


def test_spectra_are_what_run_writes(tiny, tmp_path):
    """Same statistics as `run --propagate original --svd exact`, so the same whitened spectra."""
    profile = _profile(tiny, tmp_path / "prof", sensitivity_samples=0)
    assert profile.meta["sensitivity"] is None
    run_job(JobConfig(alloc="uniform", model_dir=tiny, out_dir=tmp_path / "out", calib_samples=SAMPLES, seqlen=SEQLEN, progress=False,
                      propagate="original", svd="exact"))
    n = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    for index in range(n):
        written = load_file(str(tmp_path / "out" / "spectra" / f"block-{index:05d}.safetensors"))
        for name, s in written.items():
            np.testing.assert_allclose(profile.spectra[name].astype(np.float32), s.numpy(), rtol=1e-4, atol=1e-6)
    assert profile.tokens == SAMPLES * SEQLEN
    assert list(profile.meta["order"]) == [m.name for m in profile.matrices()]


def test_a_profile_of_other_settings_or_another_model_is_refused(tiny, tmp_path):
    profile = _profile(tiny, tmp_path / "prof", sensitivity_samples=0)
    identity = dict(profile.meta["identity"])
    assert read_profile(tmp_path / "prof", identity).digest == profile.digest
    with pytest.raises(StreamSVDError, match="seed"):
        read_profile(tmp_path / "prof", {**identity, "seed": 1})
    with pytest.raises(StreamSVDError, match="the model"):
        read_profile(tmp_path / "prof", {**identity, "checkpoint": {"config": {}, "shards": {}}})
    with pytest.raises(StreamSVDError, match="other settings than this run: --seed") as e:
        _profile(tiny, tmp_path / "prof", seed=1, sensitivity_samples=0)  # into the same folder, other settings
    assert "give another PROFILE_DIR" in e.value.fix  # not "make one with streamsvd profile": this command
    (tmp_path / "prof" / PROFILE_JSON).unlink()
    with pytest.raises(StreamSVDError, match="not a finished"):
        read_profile(tmp_path / "prof", identity)


@pytest.mark.parametrize("damage, says", [
    ("nan", "not the file the profile wrote"),           # a changed byte in the measurements: their sha256
    ("negative", "NaN, infinite or negative"),           # ... and figures that make no sense even when re-signed
    ("truncated", "cannot be read"),                     # safetensors' own SafetensorError was a traceback
    ("shape", "needs 1000"),                             # a ValueError traceback from the allocator
    ("sensitivity", "sensitivity weights"),
    ("no sensitivity", "one per matrix"),                # {} gave every matrix weight 1 unseen, the run went on
    ("sensitivity lost", "holds no sensitivity weights"),
    ("version", "streamsvd 99, newer than this one"),    # a later streamsvd's profile was read as this one's
    ("no version", "not a streamsvd version"),
    # hand edits of profile.json's form: tracebacks (AttributeError, ZeroDivisionError, TypeError, KeyError), other
    # ranks silently (a negative count, a matrix listed twice), or a file read wherever a name pointed
    ("files outside", "files_sha256 names '../x'"),
    ("files list", "files_sha256 is not a mapping"),
    ("shapes list", "shapes is not a mapping"),
    ("identity list", "identity is not a mapping"),
    ("order twice", "lists a matrix more than once"),
    ("order number", "does not match"),                  # a TypeError traceback (a probe, 2026-12-07)
    ("order nested", "does not match"),
    ("tokens zero", "token count 0 is not"),
    ("tokens negative", "token count -5 is not"),
    ("tokens text", "token count 'many' is not"),
    ("heldout samples", "no positive window count"),
    # any other edit of profile.json: the original's held-out perplexity (the --max-ppl-increase target's base) was
    # read as written
    ("heldout perplexity", "edited since: its meta_sha256 differs"),
])
def test_a_damaged_profile_is_refused(tiny, tmp_path, damage, says):
    """NaN or negative energies drove a matrix's rank to 1 with 'predicted relative loss 0.0000'."""
    import hashlib
    import shutil

    from safetensors.torch import save_file

    profile = _profile(tiny, tmp_path / "prof")
    identity = dict(profile.meta["identity"])
    bad = Path(shutil.copytree(tmp_path / "prof", tmp_path / "bad"))
    meta = json.loads((bad / PROFILE_JSON).read_text())
    name = meta["order"][1]
    if damage in ("nan", "negative"):
        weighted = load_file(str(bad / "weighted.safetensors"))
        weighted[name] = weighted[name].fill_(float("nan")) if damage == "nan" else -1e6 * weighted[name].abs() - 1
        save_file(weighted, str(bad / "weighted.safetensors"))
        if damage == "negative":  # as if the record had been written for these figures
            meta["files_sha256"]["weighted.safetensors"] = hashlib.sha256((bad / "weighted.safetensors").read_bytes()).hexdigest()
    elif damage == "truncated":
        with open(bad / "spectra.safetensors", "r+b") as f:
            f.truncate(1000)
    elif damage == "shape":
        meta["shapes"][name] = [1000, 1000]
    elif damage == "sensitivity":
        meta["sensitivity"][name] = float("nan")
    elif damage in ("no sensitivity", "sensitivity lost"):
        meta["sensitivity"] = {} if damage == "no sensitivity" else None
    elif damage == "files outside":
        meta["files_sha256"]["../x"] = "0" * 64
    elif damage in ("files list", "shapes list", "identity list"):
        meta[damage.split()[0].replace("files", "files_sha256")] = ["x"]
    elif damage == "order twice":
        meta["order"].append(name)
    elif damage in ("order number", "order nested"):
        meta["order"] = 5 if damage == "order number" else [[1]]
    elif damage.startswith("tokens"):
        meta["tokens"] = {"tokens zero": 0, "tokens negative": -5, "tokens text": "many"}[damage]
    elif damage == "heldout samples":
        meta["heldout"] = {"perplexity": 5.0}
    elif damage == "heldout perplexity":
        meta["heldout"] = {"perplexity": 5.0, "samples": 2}
    else:
        meta["version"] = 99 if damage == "version" else "x"
    (bad / PROFILE_JSON).write_text(json.dumps(meta))
    with pytest.raises(StreamSVDError, match=says):
        read_profile(bad, identity)
    assert read_profile(tmp_path / "prof", identity).digest == profile.digest  # the intact one still reads


def test_a_profile_whose_shapes_are_not_the_models_is_refused_by_run_and_plan(tiny, tmp_path, capsys):
    """A shape edited in profile.json with the same smaller side ([64, 64] -> [64, 6400]) kept its spectrum's length
    and was allocated as that matrix: --ratio 0.4 came out 0.011, no word said."""
    from streamsvd.cli import main

    _profile(tiny, tmp_path / "prof")
    meta = json.loads((tmp_path / "prof" / PROFILE_JSON).read_text())
    name = meta["order"][0]
    m, n = meta["shapes"][name]
    meta["shapes"][name] = [m, 100 * n] if m <= n else [100 * m, n]
    (tmp_path / "prof" / PROFILE_JSON).write_text(json.dumps(meta))
    with pytest.raises(StreamSVDError, match="edited since"):  # the profile's own digest sees the edit
        read_profile(tmp_path / "prof")
    del meta["meta_sha256"]  # a profile made before that digest: the shapes against the model's still refuse it
    (tmp_path / "prof" / PROFILE_JSON).write_text(json.dumps(meta))
    flags = ["--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--no-progress", "--profile", str(tmp_path / "prof")]
    for argv in (["run", str(tiny), str(tmp_path / "out")], ["plan", str(tiny)]):
        assert main([*argv, *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"{name} has shape" in err and "in the model" in err and "fix:" in err
    assert not (tmp_path / "out").exists()


def test_a_profile_dir_in_the_model_dir_is_refused(tiny, tmp_path, capsys):
    """Its files landed among the checkpoint's shards."""
    from streamsvd.cli import main

    before = sorted(p.name for p in tiny.iterdir())
    for where in (tiny, tiny / "prof"):
        assert main(["profile", str(tiny), str(where), "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "MODEL_DIR or inside it" in err and "fix:" in err
    assert sorted(p.name for p in tiny.iterdir()) == before


def test_the_same_profile_command_twice_reuses_it(tiny, tmp_path):
    first = _profile(tiny, tmp_path / "prof", sensitivity_samples=0)
    stamp = (tmp_path / "prof" / PROFILE_JSON).stat().st_mtime_ns
    again = _profile(tiny, tmp_path / "prof", sensitivity_samples=0)
    assert again.digest == first.digest and (tmp_path / "prof" / PROFILE_JSON).stat().st_mtime_ns == stamp
    assert not (tmp_path / "prof" / ".profile-work").exists()


def test_bad_profile_input_ends_with_one_error_and_a_fix(tiny, tmp_path, capsys):
    from streamsvd.cli import main

    (tmp_path / "file").write_text("x")
    base = ["profile", str(tiny), "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--no-progress"]
    for args, says in [([str(tmp_path / "file")], "is a file"),
                       ([str(tmp_path / "p"), "--sensitivity-samples", "17"], "--sensitivity-samples 17"),
                       ([str(tmp_path / "p"), "--calib-samples", "0"], "--calib-samples 0"),
                       ([str(tmp_path / "p"), "--seqlen", "100000"], "longer than the model allows")]:
        assert main(base[:2] + args[:1] + base[2:] + args[1:]) == 2
        err = capsys.readouterr().err
        assert says in err and "fix: " in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()


def test_a_profile_that_would_not_fit_its_disk_is_refused_before_writing(tiny, tmp_path, monkeypatch):
    from streamsvd.io import diskspace
    from streamsvd.job.profile import Profiler

    cfg = ProfileConfig(tiny, tmp_path / "prof", calib_samples=SAMPLES, seqlen=SEQLEN, sensitivity_samples=KEEP, progress=False)
    needs = Profiler(cfg).disk_needs()
    hidden = json.loads((tiny / "config.json").read_text())["hidden_size"]
    layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    assert sum(needs.values()) > (2 * SAMPLES + (layers + 1) * KEEP) * SEQLEN * hidden * 4
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1000)
    with pytest.raises(StreamSVDError, match="not enough disk space"):
        make_profile(cfg)
    assert not (tmp_path / "prof").exists()



def test_the_statistics_pass_takes_the_first_profile_samples_windows(tiny, tmp_path):
    """--profile-samples 4 of 6 calibration windows: the spectra, weighted energies and sensitivity of a profile made
    with --calib-samples 4 (the first 4 windows are the same ones), byte for byte; not those of all 6; the identity
    says so, and the same folder with another count is made again, with the same count reused."""
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert torch.equal(sample_windows(tokenizer, default_text(), SAMPLES, SEQLEN, 0)[:KEEP],
                       sample_windows(tokenizer, default_text(), KEEP, SEQLEN, 0))  # what the comparison rests on
    part = _profile(tiny, tmp_path / "part", profile_samples=KEEP)
    first = _profile(tiny, tmp_path / "first", calib_samples=KEEP)
    every = _profile(tiny, tmp_path / "every")
    for name in ("spectra.safetensors", "weighted.safetensors"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
        assert (tmp_path / "part" / name).read_bytes() != (tmp_path / "every" / name).read_bytes(), name
    assert part.meta["sensitivity"] == first.meta["sensitivity"] == every.meta["sensitivity"]
    assert part.tokens == KEEP * SEQLEN and every.tokens == SAMPLES * SEQLEN
    assert part.meta["identity"]["profile_samples"] == KEEP and part.meta["identity"]["calib_samples"] == SAMPLES
    assert "profile_samples" not in every.meta["identity"]  # all windows: the identity of profiles from before
    # more than there are: all of them, the same profile as without the flag
    assert _profile(tiny, tmp_path / "every", profile_samples=SAMPLES + 10).reused
    again = _profile(tiny, tmp_path / "part", profile_samples=KEEP + 1)
    assert not again.reused and again.tokens == (KEEP + 1) * SEQLEN
    assert _profile(tiny, tmp_path / "part", profile_samples=KEEP + 1).reused


def test_profile_samples_below_the_sensitivity_windows_are_refused(tiny, tmp_path, capsys):
    from streamsvd.cli import main

    with pytest.raises(StreamSVDError, match="--profile-samples 3 is out of range") as e:
        _profile(tiny, tmp_path / "p", profile_samples=KEEP - 1)
    assert f"give {KEEP} " in e.value.fix
    assert main(["profile", str(tiny), str(tmp_path / "p"), "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN),
                 "--profile-samples", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--profile-samples 0" in err and "fix: " in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()


def test_another_sensitivity_count_makes_the_profile_again_except_a_runs_own(tiny, tmp_path):
    """`streamsvd profile` into a folder holding a profile of other --sensitivity-samples makes it again (the
    weights come from other windows), and reuses it for the same count; a run's own profile (any_sensitivity, as
    ProfileConfig.for_job makes it) keeps what the job started with."""
    first = _profile(tiny, tmp_path / "prof")
    fewer = _profile(tiny, tmp_path / "prof", sensitivity_samples=KEEP - 1)
    assert not fewer.reused and fewer.meta["sensitivity_samples"] == KEEP - 1
    assert fewer.meta["sensitivity"] != first.meta["sensitivity"]
    assert _profile(tiny, tmp_path / "prof", sensitivity_samples=KEEP - 1).reused
    kept = _profile(tiny, tmp_path / "prof", any_sensitivity=True)
    assert kept.reused and kept.meta["sensitivity_samples"] == KEEP - 1


def test_a_profile_of_the_same_text_cut_by_another_tokenizer_is_refused(tmp_path, capsys):
    """The identity named the text, not its tokens: a MODEL_DIR whose tokenizer was swapped (same config and shards)
    had its profile of other windows reused (12 of 21 ranks differ). The windows' digest is matched where both have
    it; a profile made before it (none in its identity) is read as before."""
    import shutil

    from streamsvd.cli import main
    from streamsvd.job.profile import _meta_digest
    from tiny_models import tiny_tokenizer

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model")
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    tiny_tokenizer(add_bos=True).save_pretrained(other)  # the same text, windows that start with BOS
    flags = ["--calib-samples", "4", "--seqlen", "32", "--max-mem", "4G"]
    assert main(["profile", str(other), str(tmp_path / "prof"), *flags[:4], "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plan", str(model_dir), *flags, "--profile", str(tmp_path / "prof")]) == 2
    err = capsys.readouterr().err
    assert "made with other settings than this run: the calibration windows' tokens" in err and "fix:" in err
    assert main(["plan", str(other), *flags, "--profile", str(tmp_path / "prof")]) == 0
    # a profile from before the digest: read as it was
    path = tmp_path / "prof" / PROFILE_JSON
    meta = json.loads(path.read_text())
    meta.pop("meta_sha256")
    del meta["identity"]["windows_digest"]
    path.write_text(json.dumps({**meta, "meta_sha256": _meta_digest(meta)}))
    capsys.readouterr()
    assert main(["plan", str(model_dir), *flags, "--profile", str(tmp_path / "prof")]) == 0


def test_a_killed_profiles_temporaries_are_gone_once_it_is_made_again(tiny, tmp_path):
    """A SIGKILL while the profile wrote its spectra left `.spectra.safetensors.tmp-PID` (never renamed into place);
    profiling again (the same command, or a run's own profile on resume) made the profile and kept that partial
    file beside it for good, also in a finished run's OUT_DIR/profile."""
    straight = tmp_path / "straight"
    _profile(tiny, straight, sensitivity_samples=0)
    prof = tmp_path / "prof"
    prof.mkdir()
    stale = [prof / ".spectra.safetensors.tmp-4194999", prof / ".profile_log.json.tmp-4194999"]
    for path in stale:  # what the kill left: no profile.json, so the profile is made again
        path.write_bytes(b"partial")
    (prof / "unrelated.tmp-1").write_bytes(b"someone else's")  # not a temporary of the profile's files: kept
    _profile(tiny, prof, sensitivity_samples=0)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in prof.iterdir()) == sorted([*(p.name for p in straight.iterdir()), "unrelated.tmp-1"])


def test_a_second_profile_into_the_same_folder_is_refused_while_the_first_runs(tiny, tmp_path, capsys):
    """Two profiles into one PROFILE_DIR shared its activation files: the first to finish removed them under the other
    (a FileNotFoundError traceback, seen on SmolLM2), or two settings' statistics were mixed. PROFILE_DIR is locked."""
    from streamsvd.cli import main
    from streamsvd.job.lock import DirLock

    prof = tmp_path / "prof"
    prof.mkdir()
    held = DirLock(prof, "PROFILE_DIR").acquire()  # another profile under way (the lock is per open file)
    try:
        base = ["profile", str(tiny), str(prof), "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--no-progress"]
        assert main(base) == 2
        err = capsys.readouterr().err
        assert f"PROFILE_DIR {prof} is in use by another streamsvd job" in err and "choose another PROFILE_DIR" in err
        assert "Traceback" not in err and not (prof / PROFILE_JSON).exists()
    finally:
        held.release()
    assert main(base) == 0 and (prof / PROFILE_JSON).exists() and not (prof / ".streamsvd.lock").exists()


def test_two_profiles_given_one_work_dir_use_their_own_folders(tiny, tmp_path):
    """--work-dir DIR put every profile's activation files in DIR/streamsvd-profile: two profiles at once with one
    --work-dir wrote the same files. The folder is named by the profile's folder now."""
    from streamsvd.job.profile import Profiler

    work = tmp_path / "work"
    work.mkdir()
    one, two = (Profiler(ProfileConfig(tiny, tmp_path / name, calib_samples=SAMPLES, seqlen=SEQLEN, sensitivity_samples=KEEP,
                                       progress=False, work_dir=work)) for name in ("a", "b"))
    assert one.work_base.parent == two.work_base.parent == work and one.work_base != two.work_base
    assert one.work_base == Profiler(ProfileConfig(tiny, tmp_path / "a", calib_samples=SAMPLES, seqlen=SEQLEN,
                                                   progress=False, work_dir=work)).work_base
    one.run()
    assert list(work.iterdir()) == []


def test_a_profile_killed_while_made_again_over_an_earlier_one_is_made_by_the_same_command(tiny, tmp_path, monkeypatch):
    """Killed after weighted.safetensors was replaced but before the new profile.json: the old profile.json named the
    new file as not its own, and every rerun of the same command was refused with a fix naming that command."""
    import streamsvd.job.profile as profile_module

    _profile(tiny, tmp_path / "prof")
    real_save, saved = profile_module.save_file, []

    def stop_after_one(tensors, path, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt  # killed while writing the second file
        real_save(tensors, path, *args, **kwargs)
        saved.append(path)

    monkeypatch.setattr(profile_module, "save_file", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        _profile(tiny, tmp_path / "prof", sensitivity_samples=KEEP - 1)  # other measurements: made again
    monkeypatch.setattr(profile_module, "save_file", real_save)
    assert saved and not (tmp_path / "prof" / PROFILE_JSON).exists()  # unfinished, not a damaged finished one
    again = _profile(tiny, tmp_path / "prof", sensitivity_samples=KEEP - 1)
    assert again.meta["sensitivity_samples"] == KEEP - 1
    assert read_profile(tmp_path / "prof").digest == again.digest


def test_profile_into_a_folder_holding_another_settings_profile_says_to_give_another_folder(tmp_path, capsys):
    """Its fix was "make one with `streamsvd profile`": the very command it refused (a probe, 2026-12-07)."""
    from streamsvd.cli import main

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model")
    flags = ["--calib-samples", "4", "--seqlen", "32", "--no-progress"]
    assert main(["profile", str(model_dir), str(tmp_path / "prof"), *flags]) == 0
    capsys.readouterr()
    assert main(["profile", str(model_dir), str(tmp_path / "prof"), *flags, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "other settings than this run: --seed" in err
    assert "give another PROFILE_DIR" in err and "make one with" not in err


def test_profile_into_a_folder_of_other_files_is_refused_and_leaves_them(tmp_path, capsys):
    """`profile MODEL out/spectra` wrote profile.json and its tensors among a finished output's files (and replaced
    any of the same names; a probe, 2026-12-07): a non-empty folder without a profile is refused."""
    from streamsvd.cli import main

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=2)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "plan.txt").write_text("mine")
    flags = ["--calib-samples", "4", "--seqlen", "32", "--no-progress"]
    assert main(["profile", str(model_dir), str(folder), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "not empty and holds no profile" in err and "fix:" in err
    assert sorted(p.name for p in folder.iterdir()) == ["plan.txt"]


def test_a_profile_budget_too_small_names_a_stage_the_profile_runs(tmp_path, capsys):
    """`streamsvd profile` writes no shards: its smallest budget was set by the job's extra-shard copy buffer (16 MiB,
    the largest part on a tiny model), a stage it never enters. Its plan holds only the stages it runs."""
    from streamsvd.cli import main
    from streamsvd.job.plan import PROFILE_SKIPS

    model = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=2)
    cfg = ProfileConfig(model_dir=model, profile_dir=tmp_path / "p", calib_samples=4, seqlen=32, progress=False)
    from streamsvd.io.checkpoint import Checkpoint

    plan = cfg.plan(Checkpoint(model))
    assert plan.stage_bytes and not PROFILE_SKIPS & set(plan.stage_bytes), sorted(plan.stage_bytes)
    capsys.readouterr()
    assert main(["profile", str(model), str(tmp_path / "p"), "--calib-samples", "4", "--seqlen", "32",
                 "--max-mem", "100M", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and f"set by the {plan.min_stage} stage" in err and "extra shard" not in err, err
    assert not (tmp_path / "p").exists()

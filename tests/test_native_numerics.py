"""The native runtime's numerics (cpp/native/numerics) against the Python runtime they port: numpy's
default_rng bit for bit, every scheduler (golden vectors, then tables and whole loops over many configs and
step counts, with refusals and their messages), the tokenizers on thousands of strings, the strict JSON
reader. The C++ side runs through the `ldm_rt_numerics_probe` test driver, built once per session."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_rt.runtime.sampler_spec import vector_model_output
from ldm_rt.runtime.schedulers import SchedulerConfig, SchedulerConfigError, make_scheduler, sd_scheduler_config
from ldm_rt.runtime.schedulers.base import SchedulerStepError
from ldm_rt.runtime.schedulers.registry import SCHEDULERS, usable_schedulers
from ldm_rt.runtime.tokenizer import PromptTokenizer

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "sampler_vectors.json"
DEFAULT_TOKENIZER = REPO / "engines" / "default" / "artifacts" / "tokenizer.json"
sys.path.insert(0, str(REPO / "tests"))
from cmake_build import built_probe, native_build  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> Path:
    """The test driver, from the native tests' one shared build (LDM_RT_NUMERICS_PROBE: an already built one,
    for local iteration)."""
    if os.environ.get("LDM_RT_NUMERICS_PROBE"):
        return Path(os.environ["LDM_RT_NUMERICS_PROBE"])
    return built_probe(native_build(tmp_path_factory))


def run_probe(probe: Path, *args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(probe), *args], input=stdin, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def bits(hexes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint32).view(np.float32)


# ---- numpy's default_rng -----------------------------------------------------------------------------------
RNG_SEEDS = [0, 1, 2, 7, 42, 1234, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 5, 2**53 + 1, 2**63, 2**64 - 1] + [
    random.Random(0).getrandbits(64) for _ in range(27)
]


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_standard_normal_float32_matches_numpy_bit_for_bit(probe, seed):
    # 20000 draws reach the ziggurat's wedge and tail branches ~140 times per seed.
    out = json.loads(run_probe(probe, "rng", str(seed), "20000").stdout)
    ref = np.random.default_rng(seed).standard_normal(20000, dtype=np.float32)
    assert np.array_equal(bits(out).view(np.uint32), ref.view(np.uint32))


def test_ziggurat_tail_and_wedge_branches_match(probe):
    # One long stream: ~7000 draws leave the rectangles, ~70 the tail beyond r = 3.654.
    out = bits(json.loads(run_probe(probe, "rng", "20261202", "1000000").stdout))
    ref = np.random.default_rng(20261202).standard_normal(1_000_000, dtype=np.float32)
    assert np.abs(ref).max() > 3.7  # the tail branch was exercised
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("seed", [0, 99, 2**64 - 1])
def test_pcg64_raw_uint32_and_double_draws_match_numpy(probe, seed):
    out = json.loads(run_probe(probe, "rng-raw", str(seed), "10").stdout)
    bg = np.random.default_rng(seed).bit_generator
    assert [int(h, 16) for h in out["uint64"]] == bg.random_raw(10).tolist()
    g = np.random.default_rng(seed)
    g.bit_generator.random_raw(10)
    assert out["uint32"] == g.integers(0, 2**32, size=3, dtype=np.uint32).tolist()
    assert out["double"] == g.random()


def test_draw_order_is_the_initial_noise_then_one_draw_per_noise_step(probe):
    # docs/sampler_spec.md, Randomness: one generator per request, arrays filled in C order, in call order.
    shapes = [[2, 4, 8, 8], [2, 4, 8, 8], [1, 3], [5]]
    out = json.loads(run_probe(probe, "rng-shapes", "7", *map(json.dumps, shapes)).stdout)
    rng = np.random.default_rng(7)
    for got, shape in zip(out, shapes):
        ref = rng.standard_normal(tuple(shape), dtype=np.float32).ravel()
        assert np.array_equal(bits(got).view(np.uint32), ref.view(np.uint32))


# ---- schedulers ----------------------------------------------------------------------------------------------
def assert_timesteps(got: list[float], ref: list[float], label: str) -> None:
    """Equal float32 timesteps, except that the fractional ones of Karras sigmas may move by an ulp: they are
    read back through numpy's float32 log, CPU-dispatched SIMD code that is not correctly rounded (it differs
    from the correctly rounded logf in ~20% of SD's 1000 training sigmas, by one ulp)."""
    np.testing.assert_allclose(np.float32(got), np.float32(ref), rtol=2.5e-7, atol=0, err_msg=label)


def test_golden_vectors_every_case_bit_for_bit(probe):
    """Every case of tests/golden/sampler_vectors.json replayed with its recorded noise: model inputs,
    samples and final latents equal the Python runtime's float32 bits (the spec allows rtol 1e-5)."""
    doc = json.loads(GOLDEN.read_text())
    out = json.loads(run_probe(probe, "golden", str(GOLDEN)).stdout)
    assert len(out) == len(doc["cases"])
    not_ported = sorted({c["scheduler"] for c, o in zip(doc["cases"], out) if o.get("skipped")})
    assert not not_ported, f"schedulers in the golden vectors without a native port: {not_ported}"
    inexact = []
    for case, got in zip(doc["cases"], out):
        label = f"{case['config']}/{case['scheduler']}/{case['steps']}"
        assert_timesteps(got["timesteps"], case["timesteps"], label)
        assert np.float32(got["init_noise_sigma"]) == np.float32(case["init_noise_sigma"]), label
        assert len(got["loop"]) == len(case["loop"]), label
        for step, (g, c) in enumerate(zip(got["loop"], case["loop"])):
            for key in ("model_input", "model_output", "sample"):
                a, b = bits(g[key]), np.array(c[key], dtype=np.float32)
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{label} step {step} {key}")
        final = bits(got["final"])
        np.testing.assert_allclose(final, np.float32(case["final"]), rtol=1e-5, atol=1e-6, err_msg=label)
        if not np.array_equal(final, np.float32(case["final"])):
            inexact.append(label)
    # Today every case is bit-exact; a libm difference may move one by an ulp, not more than a few.
    assert len(inexact) <= 3, inexact


BASE = sd_scheduler_config()
CONFIGS = {
    "sd-v1": BASE,
    "v-prediction": {**BASE, "prediction_type": "v_prediction"},
    "zero-snr-trailing": {**BASE, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                          "rescale_betas_zero_snr": True},
    "linspace": {**BASE, "timestep_spacing": "linspace", "steps_offset": 0},
    "linear-alpha-one": {**BASE, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                         "set_alpha_to_one": True, "steps_offset": 0, "skip_prk_steps": False},
    "cosine-sample": {**BASE, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
                      "clip_sample": True, "timestep_spacing": "trailing"},
    "karras-range-sigma-min": {**BASE, "sigma_min": 0.1, "sigma_max": 10.0, "final_sigmas_type": "sigma_min",
                               "lower_order_final": False},
    "solvers": {**BASE, "solver_type": "heun", "thresholding": True, "dynamic_thresholding_ratio": 0.9,
                "sample_max_value": 1.5, "lambda_min_clipped": -4.0, "euler_at_final": True},
    "unipc-bh1-order3": {**BASE, "solver_type": "bh1", "solver_order": 3, "disable_corrector": [0, 2],
                         "timestep_spacing": "linspace", "original_inference_steps": 25, "timestep_scaling": 5.0},
    "ddpm-variance": {**BASE, "variance_type": "fixed_large", "clip_sample": True, "clip_sample_range": 2.0},
    "few-train-steps": {**BASE, "num_train_timesteps": 100, "steps_offset": 0, "trained_betas": None},
}  # fmt: skip
STEP_COUNTS = (1, 2, 4, 13, 30)
SHAPE = [1, 4, 3, 3]


def python_job(config: dict, name: str, steps: int, seed: int, strength: float | None, **options: float) -> dict:
    """What the probe's batch job computes, with the Python runtime: tables, noise steps and the formula loop."""
    try:
        run = make_scheduler(name, SchedulerConfig.from_dict(config), **options).set_timesteps(steps)
        if strength is not None:
            run = run.with_strength(strength)
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(tuple(SHAPE), dtype=np.float32)
        if strength:
            x = run.add_noise(np.full(SHAPE, 0.5, np.float32), noise, 0)
        else:
            x = noise * np.float32(run.init_noise_sigma)
        drawn: list[int] = []

        class Recorder:
            def standard_normal(self, size, dtype=np.float32):
                drawn.append(i)
                return rng.standard_normal(size, dtype=dtype)

        for i, t in enumerate(run.timesteps):
            x = run.step(vector_model_output(run.scale_model_input(x, i), t), i, x, generator=Recorder())
    except (SchedulerConfigError, SchedulerStepError) as e:
        return {"error": str(e)}
    return {
        "timesteps": np.asarray(run.timesteps, np.float64).tolist(),
        "sigmas": np.asarray(getattr(run, "sigmas", []), np.float64).tolist(),
        "init_noise_sigma": float(run.init_noise_sigma),
        "noise_steps": drawn,
        "final": x,
    }


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_every_scheduler_matches_python_over_configs_and_step_counts(probe, tmp_path, config_name):
    """For every registered name, step count and txt2img / img2img (strength 0.6): the same refusal message,
    or the same timesteps, sigmas, init_noise_sigma, noise steps, and final latents of a whole loop drawing
    its noise from default_rng (the golden formula as the model)."""
    config = CONFIGS[config_name]
    names = sorted(SCHEDULERS)
    jobs = [
        {"config": config, "name": n, "steps": s, "seed": 1000 + s, "shape": SHAPE, "strength": strength}
        for n in names
        for s in STEP_COUNTS
        for strength in (None, 0.6)
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    results = json.loads(run_probe(probe, "batch", str(tmp_path / "jobs.json")).stdout)
    assert len(results) == len(jobs)
    ran = 0
    for job, got in zip(jobs, results):
        label = f"{config_name}/{job['name']}/{job['steps']}/strength={job['strength']}"
        ref = python_job(config, job["name"], job["steps"], job["seed"], job["strength"])
        if "error" in ref or "error" in got:
            assert got.get("error") == ref.get("error"), label
            continue
        ran += 1
        assert_timesteps(got["timesteps"], ref["timesteps"], label)
        assert np.array_equal(np.float32(got["sigmas"]), np.float32(ref["sigmas"])), label
        assert np.float32(got["init_noise_sigma"]) == np.float32(ref["init_noise_sigma"]), label
        assert got["noise_steps"] == ref["noise_steps"], label
        np.testing.assert_allclose(bits(got["final"]), ref["final"].ravel(), rtol=1e-5, atol=1e-6, err_msg=label)
    assert ran >= len(jobs) // 2  # most combinations sample; the rest compared their refusals


@pytest.mark.parametrize("guidance,dim,rows", [(8.0, 256, 2), (1.0, 32, 1), (4.5, 33, 3), (1.5, 2, 1), (2.0, 1, 1)])
def test_lcm_guidance_embedding_matches_python(probe, guidance, dim, rows):
    """timestep_cond of LCM-distilled UNets. float32 like diffusers: an ulp of exp moves the argument
    w * 1000 * f by an ulp of its size (5e-4 at w = 7), and sin / cos with it; exact at w = 0."""
    from ldm_rt.runtime.schedulers.lcm import guidance_embedding

    got = bits(json.loads(run_probe(probe, "guidance-embedding", str(guidance), str(dim), str(rows)).stdout))
    ref = guidance_embedding(guidance, dim, rows).ravel()
    assert got.shape == ref.shape
    arg_ulp = np.spacing(np.float32((guidance - 1) * 1000))
    np.testing.assert_allclose(got, ref, rtol=0, atol=max(2 * float(arg_ulp), 1e-6))
    assert np.mean(got == ref) > 0.4  # most values are bit-exact


def test_scheduler_options_ddim_eta_and_tcd_gamma_match_python(probe, tmp_path):
    cases = [("ddim", "eta", v) for v in (0.0, 0.5, 1.0, -1.0)] + [("tcd", "gamma", v) for v in (0.0, 0.3, 1.0, 1.5)]
    cases += [("dpmpp-2s-a", "eta", v) for v in (0.0, 0.5, 1.0, 1.5)]
    jobs = [
        {"config": BASE, "name": n, "steps": s, "seed": 5, "shape": SHAPE, "strength": st, "option": v}
        for n, _, v in cases
        for s in (4, 9)
        for st in (None, 0.7)
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    results = json.loads(run_probe(probe, "batch", str(tmp_path / "jobs.json")).stdout)
    options = {(n, v): {key: v} for n, key, v in cases}
    for job, got in zip(jobs, results):
        ref = python_job(BASE, job["name"], job["steps"], 5, job["strength"], **options[job["name"], job["option"]])
        label = f"{job['name']}={job['option']}/{job['steps']}/{job['strength']}"
        if "error" in ref or "error" in got:
            assert got.get("error") == ref.get("error"), label
            continue
        assert got["noise_steps"] == ref["noise_steps"], label
        np.testing.assert_allclose(bits(got["final"]), ref["final"].ravel(), rtol=1e-5, atol=1e-6, err_msg=label)
    assert sum("error" in r for r in results) == 12  # eta -1, gamma 1.5 and 2S a's eta 1.5 refused, with the runtime's words


def test_usable_schedulers_and_refusals_match_python(probe, tmp_path):
    for name, config in CONFIGS.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        got = json.loads(run_probe(probe, "usable", str(path)).stdout)
        usable, unusable = usable_schedulers(SchedulerConfig.from_dict(config))
        assert got["usable"] == list(usable), name
        assert got["unusable"] == unusable, name
    zero = json.loads(run_probe(probe, "usable", str(tmp_path / "zero-snr-trailing.json")).stdout)
    assert {"pndm", "lms", "heun"} <= set(zero["unusable"])  # the refusals were compared, not only the successes


BAD_CONFIGS = [
    {"beta_schedule": "cosine"},
    {"prediction_type": "x0"},
    {"num_train_timesteps": 1000.0},
    {"num_train_timesteps": 1},
    {"beta_start": "0.1"},
    {"clip_sample": 1},
    {"beta_start": 0.5, "beta_end": 0.1},
    {"trained_betas": [0.1, 0.2]},
    {"use_karras_sigmas": True, "use_exponential_sigmas": True},
    {"timestep_type": "continuous"},
    {"variance_type": "learnt"},
    {"solver_order": 4},
    {"disable_corrector": [-1]},
    {"steps_offset": -1},
    {"dynamic_thresholding_ratio": 0},
    {"sigma_min": -1.0},
    {"original_inference_steps": 0},
    {"timestep_scaling": 0},
]


@pytest.mark.parametrize("changes", BAD_CONFIGS, ids=lambda c: ",".join(c))
def test_bad_scheduler_configs_get_the_runtimes_message(probe, tmp_path, changes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **changes}))
    r = run_probe(probe, "config", str(path), ok=False)
    with pytest.raises(SchedulerConfigError) as e:
        SchedulerConfig.from_dict({**BASE, **changes})
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {e.value}"


def test_step_misuse_is_refused_like_python(probe, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE))
    bad = [("unknown-name", 4), ("ddim", 0), ("ddim", 1001), ("lcm", 51)]
    for name, steps in bad:
        r = run_probe(probe, "schedule", str(path), name, str(steps), ok=False)
        with pytest.raises(SchedulerConfigError) as e:
            make_scheduler(name, SchedulerConfig.from_dict(BASE)).set_timesteps(steps)
        assert r.stderr.strip() == f"error: {e.value}", name
    for strength in ("0", "1.5", "0.01"):
        r = run_probe(probe, "schedule", str(path), "ddim", "4", strength, ok=False)
        with pytest.raises(SchedulerConfigError) as e:
            make_scheduler("ddim", SchedulerConfig.from_dict(BASE)).set_timesteps(4).with_strength(float(strength))
        assert r.stderr.strip() == f"error: {e.value}", strength


# ---- tokenizers ----------------------------------------------------------------------------------------------
WORDS = ["a", "photo", "of", "cat", "dog", "red", "circle", "square", "on", "background", "white", "blue", "the",
         "astronaut", "riding", "horse", "<|endoftext|>", "<|startoftext|>", "don't", "it's", "we're", "I'll",
         "you've", "DOG", "Cat", "naïve", "café", "Ünïcödé", "straße", "ΣΟΦΙΑ", "İstanbul", "日本語", "한국어"]
ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.!?'\"-_()[]{}<>|:;/\\@#$%^&*+=~`\t\n")
    + list("éÉàçñöÖßøåæœÆİıΣσςΟΔäÄαβγΩωЖжЯя日本語中文字한국어ひらがなカタカナ،؟عربي")
    + ["\u0301", "\u0308", "\u0327", "e\u0301", "A\u030a", "\u00a0", "\u2003", "\u3000", "\u200b", "\u2014",
       "\u2019", "\u201c", "…", "🙂", "🐱", "①", "½", "Ⅻ", "٣", "ﬁ", "\ufeff", "\x85", "\u2028", "\r\n"]
)  # fmt: skip


def random_prompts(n: int, seed: int) -> list[str]:
    """Words the vocabularies know, unknown words, scripts, combining marks (NFC), whitespace kinds,
    punctuation, literal special tokens, and prompts far beyond the text encoder's length."""
    rnd = random.Random(seed)

    def chars(k: int) -> str:
        return "".join(rnd.choice(ALPHABET) for _ in range(k))

    prompts = []
    for _ in range(n):
        kind = rnd.random()
        if kind < 0.4:
            prompts.append(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(0, 40))))
        elif kind < 0.75:
            prompts.append(chars(rnd.randint(0, 80)))
        else:
            parts = [rnd.choice(WORDS) if rnd.random() < 0.5 else chars(rnd.randint(1, 8)) for _ in range(rnd.randint(1, 14))]
            prompts.append(rnd.choice([" ", "", "  ", ",", "\n"]).join(parts))
    return prompts + ["", " ", "a" * 600, "red " * 300, "<|endoftext|>" * 3, "İ ΣΑΣ ﬁ ½"]


def compare_tokenizer(probe: Path, path: Path, prompts: list[str], caplog) -> dict:
    tok = PromptTokenizer.from_file(path)
    got = json.loads(run_probe(probe, "tokenize", str(path), stdin=json.dumps(prompts)).stdout)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_rt.runtime.tokenizer"):
        ref = tok(prompts)
    assert (got["max_length"], got["bos"], got["eos"], got["pad"]) == (tok.max_length, tok.bos_id, tok.eos_id, tok.pad_id)
    assert got["vocab_size"] == tok.vocab_size
    wrong = [i for i, ids in enumerate(got["ids"]) if ids != ref.ids[i].tolist()]
    assert not wrong, [(prompts[i], got["ids"][i], ref.ids[i].tolist()) for i in wrong[:5]]
    assert got["dropped"] == ref.dropped
    assert got["warnings"] == [r.getMessage() for r in caplog.records]
    return got


def test_word_level_tokenizer_of_the_default_model_matches_tokenizers(probe, caplog):
    prompts = random_prompts(3000, seed=1)
    got = compare_tokenizer(probe, DEFAULT_TOKENIZER, prompts, caplog)
    assert sum(1 for d in got["dropped"] if d) > 500  # truncation exercised (16 tokens)
    assert sum(1 for u in got["unknown"] if u) > 1000  # unknown words exercised


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tiny_clip_bpe_tokenizer_matches_tokenizers(probe, tmp_path, caplog, pad_token):
    from tiny_models import write_tiny_clip_tokenizer

    folder = write_tiny_clip_tokenizer(tmp_path / "tokenizer", pad_token=pad_token)
    PromptTokenizer.from_diffusers_folder(folder).save(tmp_path / "tokenizer.json")
    compare_tokenizer(probe, tmp_path / "tokenizer.json", random_prompts(1500, seed=2), caplog)


def test_trained_clip_bpe_with_thousands_of_merges_matches_tokenizers(probe, tmp_path, caplog):
    """A CLIP-configured byte-level BPE trained here on text like the prompts (thousands of merges, so
    real merge chains and competing ranks), loaded as SD's vocab.json + merges.txt."""
    from tiny_models import write_tiny_clip_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = random_prompts(4000, seed=3)
    # CLIP's normalizer and pre-tokenizer, from the tiny CLIP tokenizer
    clip = PromptTokenizer.from_diffusers_folder(write_tiny_clip_tokenizer(tmp_path / "tiny"))
    base = Tokenizer.from_str(clip.to_str())
    trainee = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainee.normalizer = base.normalizer
    trainee.pre_tokenizer = base.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=4000, end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainee.train_from_iterator(corpus, trainer)
    model = json.loads(trainee.to_str())["model"]
    vocab = dict(model["vocab"])
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert len(merges) > 2000
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    PromptTokenizer.from_clip_files(tmp_path / "vocab.json", tmp_path / "merges.txt").save(tmp_path / "tokenizer.json")
    # Words of 100k characters: merged in O(n log n) as tokenizers does (a quadratic loop would stall here).
    long_words = ["photo" * 20000, "ab" * 50000 + " cat", "ü" * 100000]
    compare_tokenizer(probe, tmp_path / "tokenizer.json", random_prompts(3000, seed=4) + long_words, caplog)


def test_bad_tokenizer_files_are_refused_in_one_line(probe, tmp_path):
    doc = json.loads(DEFAULT_TOKENIZER.read_text())
    cases = {
        "not-json.json": "{",
        "no-padding.json": json.dumps({**doc, "padding": None}),
        "unigram.json": json.dumps({**doc, "model": {"type": "Unigram", "vocab": []}}),
        "nfkc.json": json.dumps({**doc, "normalizer": {"type": "NFKC"}}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        r = run_probe(probe, "tokenize", str(tmp_path / name), stdin="[]", ok=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(tmp_path / name) in r.stderr, r.stderr
    r = run_probe(probe, "tokenize", str(tmp_path / "missing.json"), stdin="[]", ok=False)
    assert r.stderr.strip() == f"error: {tmp_path / 'missing.json'} is missing; re-export the model"


def test_shared_tokenizer_and_schedulers_give_the_same_results_from_many_threads(probe):
    """A service loads once and generates from many threads: 8 threads share one tokenizer and one scheduler
    per name, each with its own runs and generator, and get exactly the single-threaded ids and latents."""
    got = json.loads(run_probe(probe, "threads", str(DEFAULT_TOKENIZER), "8").stdout)
    assert got == {"threads": 8, "identical": 8, "schedulers": len(SCHEDULERS)}


# ---- JSON ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["", "{", '{"a": 1,}', "[1, 2,]", "{'a': 1}", '{"a": NaN}', '{"a": Infinity}', "01", "1.", ".5", "+1", '"\\x41"',
     '"\\ud800"', '"a\tb"', "// c\n{}", "{} {}", "[" * 300 + "]" * 300, '{"a": tru}', "\ufeff{}"],
)  # fmt: skip
def test_json_reader_is_strict(probe, tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    r = run_probe(probe, "json", str(path), ok=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_json_reader_reads_what_python_writes(probe, tmp_path):
    value = {"a": [1, -0.0, 1e-7, 3.4028235e38, 12345678901234567, True, False, None],
             "s": "naïve \"quoted\" \\ / \n \u2028 🙂 \u0000", "nested": {"x": [[[]]], "": {}}}  # fmt: skip
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(value, ensure_ascii=True))
    assert json.loads(run_probe(probe, "json", str(path)).stdout) == value
    path.write_text(json.dumps(value, ensure_ascii=False))
    assert json.loads(run_probe(probe, "json", str(path)).stdout) == value

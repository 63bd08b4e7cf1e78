"""mmlit.eval: answer extraction (table-driven, adversarial, properties), normalisation, intervals against SciPy and
exact coverage, pass@k against brute force, and the harness with stand-in models and the real tiny model."""
import hashlib, io, itertools, json, math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmlit.data import CORE_TASKS, TASKS as ALL_TASKS, make_task, media
from mmlit.eval import (EvalResults, answer_nll, answer_span, answer_tag, is_degenerate, repeated_char_share, answers_match, binom_cdf,
                        check_compatible, clopper_pearson_interval, evaluate, extract_answer, grounding_verdict, last_boxed, last_number,
                        normalize_answer, option_letter, pass_at_k, pass_ks, plot_accuracy, prompt_conversation, proportion_ci,
                        score_answer, wilson_interval)
from mmlit.model import MMModel, add_lora, fit_to_tokenizer, tiny_config
from mmlit.processing import MMProcessor
TASKS = {n: ALL_TASKS[n] for n in CORE_TASKS}   # chapter 04's tasks (chapter 10 registers the jigsaw tasks; tests/test_jigsaw.py)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny tensors: one thread is faster, and two stall badly on a loaded 2-core runner."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# --- extraction --------------------------------------------------------------------------------------------------------

CASES = [
    # tags: the last complete pair wins; empty, unclosed or stray tags give no answer
    ("<answer>3</answer>", "auto", "3"), ("<ANSWER>red</Answer>", "auto", "red"), ("<answer>\n Image-2 \n</answer>", "auto", "Image-2"),
    ("<answer>1</answer> hmm <answer>2</answer>", "auto", "2"), ("<answer>2</answer><answer></answer>", "auto", None),
    ("<answer></answer>", "auto", None), ("<answer>\t</answer>", "auto", None), ("<answer>5", "auto", None),
    ("5</answer>", "auto", None), ("<answer><answer>6</answer>", "auto", "6"), ("<answer>6</answer></answer>", "auto", "6"),
    ("<answer>\\boxed{8}</answer>", "auto", "8"), ("<answer></answer> The answer is 3. \\boxed{3}", "auto", None),
    ("<answer>x</answer>" + " pad" * 5, "tag", "x"), ("no tags here 3", "tag", None),
    # boxes
    ("\\boxed{12}", "auto", "12"), ("\\boxed {12}", "auto", "12"), ("\\boxed{a{b}c}", "auto", "a{b}c"), ("\\boxed{1}\\boxed{2}", "auto", "2"),
    ("\\boxed{}", "auto", None), ("\\boxed{3", "auto", None), ("\\boxed 3", "auto", None), ("\\boxed{9}", "boxed", "9"), ("9", "boxed", None),
    # answer phrases
    ("The answer is 4.", "auto", "4"), ("answer: Image-1", "auto", "Image-1"), ("Final answer = 10", "auto", "10"),
    ("The answer is:", "auto", None), ("I will answer now. It is 4", "auto", "4"), ("The answer is 2.5. Yes.", "auto", "2.5"),
    # short answers and final numbers
    ("7", "auto", "7"), (" blue ", "auto", "blue"), ("**Image-3**", "auto", "Image-3"), ("light blue", "auto", "light blue"),
    ("I count 2 stars and 4 circles: 6", "auto", "6"), ("It is red I think", "auto", None), ("", "auto", None), (None, "auto", None),
    # numbers
    ("1,234,567 people", "number", "1234567"), ("-3", "number", "-3"), ("−3", "number", "-3"), ("0.25 of it", "number", "0.25"),
    ("Image-4", "number", "4"), ("from 3 to 5-7", "number", "7"), ("v1.2.3", "number", None), ("12,34", "number", "34"),
    ("<answer>I see 3</answer> and 9 more", "number", "3"), ("\\boxed{2} 8", "number", "2"), ("ten", "number", None),
    # letters
    ("C", "letter", "C"), ("(c)", "letter", "C"), ("[D]", "letter", "D"), ("B.", "letter", "B"), ("Answer: (A)", "letter", "A"),
    ("The answer is B, since (C) is wrong", "letter", "B"), ("<answer>Banana</answer>", "letter", None), ("(A) (B) (C) (D)", "letter", None),
    ("A. yes\nB. no", "letter", None), ("I choose option b", "letter", None), ("I choose option B", "letter", "B"),
    ("A dog is in the image", "letter", None), ("\\boxed{E}", "letter", "E"),
    # text
    ("dog", "text", "dog"), ("The dog", "text", "The dog"), ("The dog is here", "text", None), ("<answer>the cat</answer>", "text", "the cat"),
]

@pytest.mark.parametrize("text,kind,want", CASES)
def test_extraction_table(text, kind, want):
    assert extract_answer(text, kind) == want

def test_enough_cases():
    assert len(CASES) >= 40 and len({k for _, k, _ in CASES}) == 6

def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"): extract_answer("3", "integer")

HACKS = {  # outputs a reward-seeking policy could try, for a question whose answer is "3"
    "empty": "", "spaces": "   ", "newlines": "\n\n", "empty tags": "<answer></answer>", "blank tags": "<answer> \n </answer>",
    "open tag only": "<answer>", "close tag only": "</answer>", "unclosed": "<answer>3", "empty box": "\\boxed{}",
    "phrase only": "The answer is", "answer colon": "Answer:", "tags then empty": "<answer>3</answer><answer></answer>",
    "all options in one tag": "<answer>1 2 3 4 5 6</answer>", "list in tag": "<answer>1, 2, 3</answer>", "or": "<answer>3 or 4</answer>",
    "slash": "<answer>3/4</answer>", "right then wrong": "<answer>3</answer> <answer>4</answer>", "boxes": "\\boxed{3}\\boxed{4}",
    "repeated answer": "<answer>3</answer>\n" * 40, "repeated answer, no spaces": "<answer>3</answer>" * 10,
    "repeated boxes": "\\boxed{3}" * 20, "repeated sentence": "The number of stars is 3 . " * 30,
    "repeated digits": "3 " * 200, "huge": "x" * 20000 + " 3", "huge tagged": "word " * 3000 + "<answer>3</answer>",
    "broken close tag": "<answer>3</answer", "empty tag wins over phrase": "The answer is 3 <answer></answer>",
    "letters spray": "(A) 1 (B) 2 (C) 3 (D) 4 (E) 5",
}

@pytest.mark.parametrize("name", list(HACKS))
def test_reward_hacks_never_score(name):
    check = make_task("count").check
    assert not score_answer(extract_answer(HACKS[name]), "3", check), (name, extract_answer(HACKS[name]))

@pytest.mark.parametrize("kind", ["auto", "number", "text", "tag"])
def test_empty_and_format_only_give_none(kind):
    for t in ["", " ", "<answer></answer>", "<answer>", "\\boxed{}", "Answer:"]:
        assert extract_answer(t, kind) is None, (t, kind)

def test_huge_output_is_none_at_any_kind():
    huge = "<answer>3</answer> " + "a b c d e f g h i j k " * 2000
    assert all(extract_answer(huge, k) is None for k in ("auto", "number", "letter", "text", "tag", "boxed"))
    assert extract_answer("<answer>3</answer>" + " pad" * 10, max_chars=20) is None

@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/answerboxed{}\\()ABC123., -:\n")) , max_size=200), st.sampled_from(["auto", "number", "letter", "text", "tag", "boxed"]))
def test_never_raises_on_adversarial_alphabet(text, kind):
    out = extract_answer(text, kind)
    assert out is None or (isinstance(out, str) and out.strip() == out and out != "")

@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_never_raises_on_any_text(text):
    for kind in ("auto", "number", "letter"):
        out = extract_answer(text, kind)
        assert out is None or isinstance(out, str)

_WRAP = [lambda a: a, lambda a: f"<answer>{a}</answer>", lambda a: f"\\boxed{{{a}}}", lambda a: f"The answer is {a}.", lambda a: f"({a})"]

@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(TASKS)), st.lists(st.tuples(st.integers(0, 30), st.integers(0, len(_WRAP) - 1)), min_size=1, max_size=8),
       st.sampled_from([" ", "\n", ", ", " or "]))
def test_a_spray_scores_at_most_one_reference(name, picks, sep):
    task = make_task(name)
    space = task.answer_space
    text = sep.join(_WRAP[w](space[i % len(space)]) for i, w in picks)
    ex = extract_answer(text)
    assert sum(score_answer(ex, a, task.check) for a in space) <= 1, (text, ex)

def test_degenerate():
    long_cot = ("First I look at the left image: two circles, a red one near the top and a green one at the bottom. "
                "The right image has one circle in the middle and a star beside it. Two against one, so the left image "
                "has more circles. <answer>Image-1</answer>")
    assert not is_degenerate(long_cot) and extract_answer(long_cot) == "Image-1"
    assert is_degenerate("no no no no no no no no no no no no") and is_degenerate("ab" * 60) and not is_degenerate("ab" * 40)
    assert repeated_char_share("abc", 20) == 0.0 and repeated_char_share("xyz" * 30, 3) == 1.0
    assert extract_answer("<answer>3</answer>" * 10, max_repetition=None) == "3"

def test_pieces():
    assert answer_tag("<answer>a</answer><answer>b</answer>") == "b"
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_number("x = -0.5, y = 1,000") == "1000"
    assert option_letter("(A) yes (A) again") == "A"

# --- normalisation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [("3.0", "3"), ("3.000", "3"), ("+3", "3"), ("03", "3"), ("-0.0", "0"), ("1,000", "1000"),
    ("1,000,000.0", "1000000"), ("$5", "5"), ("(5)", "5"), ("5.", "5"), ("Image-1", "image 1"), ("Image_1", "IMAGE 1"),
    ("Red", "red"), (" red\n", "red"), ("'red'", "red"), ("“red”", "red"), ("\\text{red}", "red"), ("ｒｅｄ", "red"),
    ("light-blue", "light blue"), ("x = -3", "X = -3")])
def test_normalize_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)

@pytest.mark.parametrize("a,b", [("3", "-3"), ("3", "30"), ("0.3", "3"), ("1,2", "12"), ("Image-1", "Image-11"), ("image1", "image 1"),
    ("red", "reds"), ("3", "three"), ("a", "b"), ("1e3", "1000")])
def test_normalize_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)

@pytest.mark.parametrize("name", list(TASKS))
def test_normalisation_keeps_answer_spaces_apart(name):
    space = make_task(name).answer_space
    assert len({normalize_answer(a) for a in space}) == len(space)

def test_answers_match_edges():
    assert not answers_match(None, "3") and not answers_match("", "") and answers_match("Image 2", "Image-2")
    assert score_answer("3.0", "3") and not score_answer(None, "3", lambda p, a: True)

# --- intervals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (17, 50), (1, 200), (123, 400)])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_intervals_match_scipy(k, n, conf):
    from scipy.stats import binomtest
    r = binomtest(k, n)
    w, cp = r.proportion_ci(conf, method="wilson"), r.proportion_ci(conf, method="exact")
    assert wilson_interval(k, n, conf) == pytest.approx((w.low, w.high), abs=1e-9)
    assert clopper_pearson_interval(k, n, conf) == pytest.approx((cp.low, cp.high), abs=1e-9)

def _exact_coverage(method, n, ps, conf=0.95):
    "P(the interval holds p) summed exactly over the binomial outcomes, for each p."
    from scipy.stats import binom
    ci = np.array([proportion_ci(k, n, conf, method) for k in range(n + 1)])
    ks = np.arange(n + 1)
    return [float(binom.pmf(ks, n, p)[(ci[:, 0] <= p) & (p <= ci[:, 1])].sum()) for p in ps]

@pytest.mark.parametrize("n", [10, 30, 100])
def test_coverage(n):
    ps = np.linspace(0.01, 0.99, 49)
    cp, wi = _exact_coverage("clopper_pearson", n, ps), _exact_coverage("wilson", n, ps)
    assert min(cp) >= 0.95 - 1e-9                     # exact: never below nominal
    assert 0.935 < np.mean(wi) < 0.965 and min(wi) > 0.83   # Wilson: close to nominal on average

def test_binom_cdf_and_errors():
    from scipy.stats import binom
    for n, k, p in [(10, 3, .2), (50, 25, .5), (7, 0, .9), (7, 7, .1)]:
        assert binom_cdf(k, n, p) == pytest.approx(binom.cdf(k, n, p), abs=1e-12)
    with pytest.raises(ValueError, match="successes=3, n=2"): wilson_interval(3, 2)
    with pytest.raises(ValueError, match="confidence"): wilson_interval(1, 2, 1.5)
    with pytest.raises(ValueError, match="whole number"): clopper_pearson_interval(1.5, 4)
    assert wilson_interval(0, 0) == (0.0, 1.0)

# --- pass@k ------------------------------------------------------------------------------------------------------------

def test_pass_at_k_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12), (n, c, k)

def test_pass_at_k_closed_form_and_limits():
    for n, c, k in [(100, 7, 10), (200, 1, 50), (1000, 500, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError): pass_at_k(*bad)
    assert pass_ks(1) == [1] and pass_ks(16) == [1, 2, 4, 8, 16] and pass_ks(5) == [1, 2, 4, 5]

# --- harness -----------------------------------------------------------------------------------------------------------

def _fp(ids, tiles): return hashlib.sha1(ids.numpy().tobytes() + tiles.float().numpy().tobytes()).hexdigest()

class Scripted:
    "A stand-in model: recognises each prompt (tokens + pixels) and answers with reply(sample)."
    def __init__(self, proc, samples, reply):
        self.p, self.reply, self.lookup = proc, reply, {}
        for s in samples:
            x = proc.process(prompt_conversation(s), add_generation_prompt=True, **media(s))
            self.lookup[_fp(x["input_ids"], x["pixel_values"])] = s
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=32, num_return_sequences=1, **kw):
        P, L = self.p, input_ids.shape[1]
        rows = ((input_ids == P.img_context_token_id).sum(1) // P.tokens_per_tile).tolist()
        tiles = pixel_values.split(rows)
        new = [P.tokenizer(self.reply(self.lookup[_fp(i[m.bool()], t)]), add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [P.eot_token_id]
               for i, m, t in zip(input_ids, attention_mask, tiles) for _ in range(num_return_sequences)]
        out = torch.full((len(new), L + max(map(len, new))), P.pad_token_id)
        out[:, :L] = input_ids.repeat_interleave(num_return_sequences, 0)
        for r, t in enumerate(new): out[r, L:L + len(t)] = torch.tensor(t)
        return out

N = 3

@pytest.fixture(scope="module")
def proc():
    cfg = tiny_config()
    return MMProcessor.from_vision_config(cfg.vision_config, downsample_ratio=cfg.downsample_ratio)

@pytest.fixture(scope="module")
def samples():
    return [s for name in TASKS for s in make_task(name).stream("test", N)]

@pytest.fixture(scope="module")
def tiny(proc):
    torch.manual_seed(0)
    m = MMModel(tiny_config()); fit_to_tokenizer(m, proc.tokenizer)
    return m

def test_oracle_scores_100_percent(proc, samples):
    res = evaluate(Scripted(proc, samples, lambda s: f"<answer>{s['answer']}</answer>"), proc, n=N, batch_size=4)
    summ = res.summary()
    assert set(summ) == set(TASKS) | {"all"} and all(s["accuracy"] == 1.0 for s in summ.values())
    assert all(summ[t]["n"] == N for t in TASKS) and summ["all"]["n"] == N * len(TASKS)
    assert summ["all"]["ci_high"] == 1.0 and summ["all"]["x_chance"] > 1

def test_plain_answers_score_too(proc, samples):
    res = evaluate(Scripted(proc, samples, lambda s: s["answer"].lower().replace("-", " ")), proc, n=N)
    assert res.accuracy() == 1.0

def test_wrong_scores_0_percent(proc, samples):
    other = lambda s: next(o for o in s["meta"]["options"] if o != s["answer"])
    res = evaluate(Scripted(proc, samples, lambda s: f"<answer>{other(s)}</answer>"), proc, n=N)
    assert res.accuracy() == 0.0 and all(r["extracted"] is not None for r in res.records)

def test_hacking_model_scores_0_percent(proc, samples):
    spray = lambda s: "".join(f"<answer>{o}</answer>" for o in s["meta"]["options"] if o != s["answer"]) + "<answer></answer>"
    assert evaluate(Scripted(proc, samples, spray), proc, n=N).accuracy() == 0.0

def test_errors_are_recorded_not_dropped(proc):
    good = list(make_task("count").stream("test", 3))
    bad = [dict(good[1], id="bad/0", images=["/nonexistent/x.png"]), dict(good[2], id="bad/1", images=[io.BytesIO(b"\x89PNG garbage")]),
           dict(good[0], id="bad/2", images=[])]
    res = evaluate(Scripted(proc, good, lambda s: s["answer"]), proc, tasks=[("count", good + bad)])
    s = res.summary()["count"]
    assert (s["n"], s["correct"], s["errors"]) == (6, 3, 3) and s["accuracy"] == 0.5
    errs = {r["id"]: r["error"] for r in res.records if r["error"]}
    assert "no such file" in errs["bad/0"] and "not an image" in errs["bad/1"] and "placeholder" in errs["bad/2"]

def test_all_errors_batch(proc):
    bad = [dict(s, images=["/nope.png"]) for s in make_task("count").stream("test", 2)]
    res = evaluate(Scripted(proc, [], str), proc, tasks=[("count", bad)])
    assert res.summary()["count"]["errors"] == 2 and res.accuracy() == 0.0

def test_duplicate_ids_still_count_as_questions(proc):
    ss = list(make_task("count").stream("test", 2))
    res = evaluate(Scripted(proc, ss, lambda s: s["answer"]), proc, tasks=[("count", ss + ss)])
    assert res.summary()["count"]["n"] == 4 and [r["q"] for r in res.records] == [0, 1, 2, 3]

def test_custom_sample_set_without_task(proc):
    ss = list(make_task("colour_position").stream("validation", 2))
    res = evaluate(Scripted(proc, ss, lambda s: s["answer"].upper()), proc, tasks=[("my_set", ss)])
    assert res.tasks["my_set"]["chance"] is None and res.accuracy() == 1.0 and "| my_set | 2 | 100.0 |" in res.table()

def test_sampling_seed_determinism_and_pass_at_k(proc, samples):
    rnd = lambda s: s["meta"]["options"][int(torch.randint(len(s["meta"]["options"]), ()))]
    m = Scripted(proc, samples, rnd)
    kw = dict(tasks=["count", "compare_count"], n=N, greedy=False, num_samples=4, temperature=0.7)
    torch.manual_seed(123); before = torch.rand(1)
    a = evaluate(m, proc, seed=5, **kw)
    torch.manual_seed(123); b = evaluate(m, proc, seed=5, **kw); after = torch.rand(1)
    assert a.records == b.records and torch.equal(before, after)          # reproducible, caller's generator untouched
    alone = evaluate(m, proc, seed=5, **dict(kw, tasks=["compare_count"]))
    assert alone.records == [r for r in a.records if r["task"] == "compare_count"]   # a task's answers do not depend on the others
    c = evaluate(m, proc, seed=6, **kw)
    assert [r["prediction"] for r in a.records] != [r["prediction"] for r in c.records]
    s = a.summary()["count"]
    assert list(s["pass@k"]) == [1, 2, 4] and s["pass@k"][1] == pytest.approx(s["accuracy"])
    assert s["pass@k"][1] <= s["pass@k"][2] <= s["pass@k"][4]
    assert len(a.records) == 2 * N * 4

def test_json_round_trip(proc, samples, tmp_path):
    res = evaluate(Scripted(proc, samples, lambda s: s["answer"]), proc, tasks=["count", "bar_chart"], n=N)
    p = res.save(tmp_path / "deep" / "r.json")
    back = EvalResults.load(p)
    assert back.records == res.records and back.summary() == res.summary() and back.table() == res.table()
    assert back.config == res.config and back.tasks == res.tasks and not list(p.parent.glob("*.tmp"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"): EvalResults.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not mmlit evaluation results"): EvalResults.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="no results file"): EvalResults.load(tmp_path / "missing.json")

def test_table_and_plot(proc, samples):
    import matplotlib; matplotlib.use("Agg")
    res = evaluate(Scripted(proc, samples, lambda s: s["answer"]), proc, tasks=["count", "digit_sum"], n=N)
    lines = res.table().splitlines()
    assert lines[0].startswith("| task | n | accuracy % | 95 % CI | chance % | × chance") and len(lines) == 2 + 3
    assert lines[2].startswith("| count | 3 | 100.0 | 43.9–100.0 | 16.7 | 6.00 | 0 | 0 |")
    ax = plot_accuracy({"a": res, "b": res}, all_row=True)
    assert len(ax.patches) == 2 * 3 and [t.get_text() for t in ax.get_xticklabels()] == ["count", "digit_sum", "all"]

def test_argument_errors(proc, tiny):
    m = Scripted(proc, [], str)
    with pytest.raises(ValueError, match="identical answers"): evaluate(m, proc, tasks="count", num_samples=2)
    with pytest.raises(ValueError, match="temperature > 0"): evaluate(m, proc, tasks="count", greedy=False, temperature=0)
    with pytest.raises(ValueError, match="batch_size"): evaluate(m, proc, tasks="count", batch_size=0)
    with pytest.raises(ValueError, match="unknown kind 'float'"): evaluate(m, proc, tasks="count", kind={"count": "float"})
    with pytest.raises(ValueError, match="unknown task"): evaluate(m, proc, tasks="nope")
    with pytest.raises(ValueError, match="unique"): evaluate(m, proc, tasks=["count", make_task("count")])
    with pytest.raises(ValueError, match="fit_to_tokenizer"): check_compatible(MMModel(tiny_config()), proc)
    other = MMProcessor.from_vision_config(dict(image_size=64, patch_size=16))
    with pytest.raises(ValueError, match="from_vision_config"): check_compatible(tiny, other)

def test_real_tiny_model_end_to_end(proc, tiny):
    tiny.train()
    res = evaluate(tiny, proc, n=2, max_new_tokens=6, batch_size=4)
    assert tiny.training                                                 # the caller's mode is restored
    assert len(res.records) == 2 * len(TASKS) and all(r["error"] is None and isinstance(r["prediction"], str) for r in res.records)
    for name, s in res.summary().items():
        assert 0 <= s["accuracy"] <= 1 and s["n"] == (2 * len(TASKS) if name == "all" else 2)
    assert res.samples_per_s > 0 and res.timing["seconds"] > 0

def test_real_tiny_model_greedy_is_deterministic_and_sampling_seeded(proc, tiny):
    g1 = evaluate(tiny, proc, tasks=["video_motion", "compare_count"], n=2, max_new_tokens=5)
    g2 = evaluate(tiny, proc, tasks=["video_motion", "compare_count"], n=2, max_new_tokens=5, batch_size=1)
    assert [r["prediction"] for r in g1.records] == [r["prediction"] for r in g2.records]   # batching and left padding change nothing
    kw = dict(tasks=["count"], n=2, greedy=False, num_samples=3, temperature=1.5, max_new_tokens=5)
    s1, s2 = evaluate(tiny, proc, seed=3, **kw), evaluate(tiny, proc, seed=3, **kw)
    assert s1.records == s2.records and len(s1.records) == 6

# --- answer loss and the grounding verdict -----------------------------------------------------------------------------

class LogitsLM(torch.nn.Module):
    "A stand-in forward: logits from a function of the input ids."
    def __init__(self, fn): super().__init__(); self.fn = fn
    def forward(self, input_ids, attention_mask=None, pixel_values=None): return SimpleNamespace(logits=self.fn(input_ids))

def _uniform(proc): return LogitsLM(lambda ids: torch.zeros(*ids.shape, len(proc.tokenizer)))
def _peeking(proc): return LogitsLM(lambda ids: 40.0 * torch.nn.functional.one_hot(ids.roll(-1, 1), len(proc.tokenizer)).float())

def test_answer_span_excludes_only_the_end_of_turn(proc, samples):
    for s in samples:
        x = proc.process(s["conversation"], **media(s))
        a, b = answer_span(proc, x)
        sup = (x["labels"] != -100).nonzero().flatten().tolist()
        assert sup == list(range(a, b + 1)) and int(x["input_ids"][b]) == proc.eot_token_id
        assert proc.tokenizer.decode(x["input_ids"][a:b]) == s["answer"]
        assert x["input_ids"][a:b].tolist() == proc.tokenizer(s["answer"], add_special_tokens=False)["input_ids"]

def test_answer_span_last_turn_and_refusals(proc, samples):
    s = samples[0]
    x = proc.process(s["conversation"] + [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "I counted."}], **media(s))
    assert proc.tokenizer.decode(x["input_ids"][slice(*answer_span(proc, x))]) == "I counted."
    y = proc.process(s["conversation"], **media(s)); a, b = answer_span(proc, y)
    with pytest.raises(ValueError, match="truncated"): answer_span(proc, dict(y, input_ids=y["input_ids"][:b], labels=y["labels"][:b]))
    with pytest.raises(ValueError, match="no supervised tokens"):
        answer_span(proc, proc.process(prompt_conversation(s), add_generation_prompt=True, **media(s)))

def test_answer_nll_stand_ins(proc, samples):
    V = len(proc.tokenizer)
    n_tok = [len(proc.tokenizer(s["answer"], add_special_tokens=False)["input_ids"]) for s in samples]
    assert answer_nll(_uniform(proc), proc, samples, batch_size=5) == pytest.approx([k * math.log(V) for k in n_tok], abs=1e-4)
    assert answer_nll(_peeking(proc), proc, samples) == pytest.approx([0.0] * len(samples), abs=1e-6)

def test_answer_nll_errors_are_nan_not_crashes(proc, samples):
    bad = [dict(samples[0], images=["/nonexistent/x.png"]), samples[1], dict(samples[2], images=[io.BytesIO(b"junk")])]
    out = answer_nll(_uniform(proc), proc, bad, batch_size=2)
    assert math.isnan(out[0]) and math.isnan(out[2]) and math.isfinite(out[1])
    assert all(math.isnan(x) for x in answer_nll(_uniform(proc), proc, [bad[0]]))   # a batch with no good sample
    with pytest.raises(ValueError, match="does not end with an assistant turn"):
        answer_nll(_uniform(proc), proc, [dict(samples[0], conversation=prompt_conversation(samples[0]))])
    with pytest.raises(ValueError, match="batch_size"): answer_nll(_uniform(proc), proc, samples, batch_size=0)

def test_answer_nll_tiny_model(proc, tiny, samples):
    tiny.train()
    one, seven = answer_nll(tiny, proc, samples, batch_size=1), answer_nll(tiny, proc, samples, batch_size=7)
    assert tiny.training                                                 # the caller's mode is restored
    assert all(math.isfinite(x) and x > 0 for x in one)
    assert max(abs(a - b) for a, b in zip(one, seven)) < 1e-5            # batching and padding change nothing

def test_answer_nll_peft_model_matches_base_at_init(proc, samples):
    torch.manual_seed(1)
    m = MMModel(tiny_config()); fit_to_tokenizer(m, proc.tokenizer)
    base = answer_nll(m, proc, samples[:4])
    pm = add_lora(m); pm.train()
    lora = answer_nll(pm, proc, samples[:4])
    assert pm.training and lora == pytest.approx(base, abs=1e-5)       # LoRA's B starts at zero: the same model

def test_grounding_verdict_branches():
    yes = grounding_verdict(244, 400, 0.165, 400, 1.02, 1.80)
    assert (yes.above_blind, yes.below_blind_loss, yes.grounded) == (True, True, True) and yes.sentence.startswith("grounded: 61.0 %")
    overlap = grounding_verdict(20, 100, 0.165, 400, 1.02, 1.80)
    assert (overlap.above_blind, overlap.below_blind_loss, overlap.grounded) == (False, True, False)
    assert "overlaps the blind one" in overlap.sentence and "loss" not in overlap.sentence
    below = grounding_verdict(2, 100, 0.165, 400, 1.9, 1.80)
    assert "lies below the blind one" in below.sentence and "answer loss 1.90 is not below the blind 1.80" in below.sentence
    loss = grounding_verdict(244, 400, 0.165, 400, 1.80, 1.80)         # equal loss is not below
    assert (loss.above_blind, loss.below_blind_loss, loss.grounded) == (True, False, False)
    assert loss.sentence.startswith("not grounded: answer loss 1.80 is not below the blind 1.80") and str(loss) == loss.sentence
    assert not grounding_verdict(244, 400, 0.165, 400, float("nan"), 1.80).grounded
    lo, hi = grounding_verdict(10, 40, 0.3, 200, 1.0, 1.5).blind_interval
    assert (lo, hi) == wilson_interval(60, 200)
    with pytest.raises(ValueError, match="blind_accuracy"): grounding_verdict(1, 2, -0.1, 10, 1.0, 1.0)

@settings(max_examples=400, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(1, 30), st.integers(1, 30), st.data(),
       st.floats(0, 5, allow_nan=False), st.floats(0, 5, allow_nan=False))
def test_more_questions_never_undo_grounding(n, blind_n, m, blind_m, data, loss, blind_loss):
    "The same accuracies measured on more questions: a grounded verdict stays grounded."
    k, blind_k = data.draw(st.integers(0, n)), data.draw(st.integers(0, blind_n))
    small = grounding_verdict(k, n, blind_k / blind_n, blind_n, loss, blind_loss)
    large = grounding_verdict(k * m, n * m, blind_k / blind_n, blind_n * blind_m, loss, blind_loss)
    assert large.interval[0] >= small.interval[0] - 1e-12 and large.blind_interval[1] <= small.blind_interval[1] + 1e-12
    assert not small.grounded or large.grounded

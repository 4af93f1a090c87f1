"""Benchmark tasks: loaders on annotation files in each benchmark's own format, lmms-eval's
parsers on answers they must get right and wrong, the aggregate scores, and the runner."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest

from nsa_jax.data.synthetic import SyntheticConfig, write_dataset
from nsa_jax.eval import VideoError, get_task, load_samples, parsers, run_eval
from nsa_jax.eval.tasks import Sample


def write_json(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def answer_with(responses: dict[str, str]):
    """A predict callable answering by the prompt's sample: `responses[id]`, found through the
    prompt text the test registered."""

    def predict(video: str, prompt: str, max_new_tokens: int) -> str:
        return responses[prompt]

    return predict


def evaluate(tmp_path, task_name: str, ann: str, responses_by_id: dict[str, str], **kw):
    task = get_task(task_name, **kw)
    samples = load_samples(task, ann, str(tmp_path / "videos"))
    by_prompt = {s.prompt: responses_by_id[s.id] for s in samples}
    assert len(by_prompt) == len(samples), "the test needs distinct prompts"
    out = io.StringIO()
    res = run_eval(
        task, samples, answer_with(by_prompt), tmp_path / "out", progress=io.StringIO(), table=out
    )
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == res
    return samples, res, out.getvalue()


# ------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize(
    "response, want",
    [
        ("The best answer is C.", "C"),
        ("D. A book on the table", "D"),  # not the "A" of the option text
        ("(B)", "B"),
        ("  E", "E"),
        ("The answer is: the second option", None),
        ("it is hard to say what the person in the video is doing at the moment", None),
    ],
)
def test_longvideobench_parser(response, want):
    assert parsers.parse_longvideobench(response) == want


def test_longvideobench_guess_is_a_seeded_choice():
    letters = {
        parsers.longvideobench_letter("no idea", "ABCD", random.Random(s))[0] for s in range(40)
    }
    assert letters <= set("ABCD") and len(letters) > 1
    assert parsers.longvideobench_letter(
        "no idea", "AB", random.Random(3)
    ) == parsers.longvideobench_letter("no idea", "AB", random.Random(3))
    assert parsers.longvideobench_letter("C", "ABCD", random.Random(0)) == ("C", True)


@pytest.mark.parametrize(
    "response, timescope, longtimescope",
    [
        ("A", "A", "A"),
        ("Best option: A", "A", "B"),  # LongTimeScope keeps "Best" and finds its B
        ("Best answer: C", "C", "B"),
        ("The correct option is D", "D", "D"),
        ("The answer is (F)", "F", "F"),
        ("none of them", "", ""),
        ("a b c d e f g h i j k l m n", "", ""),  # over ten words and no capital A-F
    ],
)
def test_timescope_parser_and_the_longtimescope_prefix_quirk(response, timescope, longtimescope):
    assert parsers.parse_timescope(response) == timescope
    assert parsers.parse_timescope(response, prefix_quirk=True) == longtimescope


@pytest.mark.parametrize(
    "response, want",
    [
        ("A) apple", "A"),
        ("(B) the dog", "B"),
        ("C", "C"),
        (" D ", "D"),
        ("C. text", "C. text"),
        (")", ""),
        ("E)", "E"),
    ],
)
def test_mlvu_parser(response, want):
    assert parsers.parse_mlvu(response) == want


@pytest.mark.parametrize(
    "response, want",
    [
        ("B", ("B", True)),
        ("The answer is (C)", ("C", True)),
        ("Between (A) and (B) I pick (B)", ("B", True)),  # the last bracketed one
        ("it moves toward the left side of the frame", ("B", True)),  # option text
        ("no idea", ("A", False)),
    ],
)
def test_tomato_parser(response, want):
    index2ans = {"A": "right side", "B": "toward the left", "C": "up"}
    assert parsers.parse_tomato(response, ["A", "B", "C"], index2ans) == want


def test_vsibench_mra_thresholds_and_values():
    # the float division gives 10 thresholds: 0.50, 0.55, ..., 0.95
    assert parsers.mean_relative_accuracy(10.0, 10.0) == 1.0
    assert parsers.mean_relative_accuracy(11.3, 10.0) == pytest.approx(0.8)  # c <= 0.87
    assert parsers.mean_relative_accuracy(5.7, 10.0) == pytest.approx(0.2)  # c <= 0.57
    # on a threshold float rounding decides, as upstream: 0.2 > 1 - 0.8 = 0.19999999999999996
    assert parsers.mean_relative_accuracy(12.0, 10.0) == pytest.approx(0.6)
    assert parsers.mean_relative_accuracy(30.0, 10.0) == 0.0
    assert parsers.vsibench_numeric_score("3.2 meters", "3.2") == (1.0, True)
    assert parsers.vsibench_numeric_score("about 3 meters", "3") == (0.0, False)
    assert parsers.vsibench_first_word("B. the chair") == "B"


# ------------------------------------------------------------------------------ tasks


def test_longvideobench_prompt_and_scores_by_group(tmp_path):
    recs = [
        dict(
            id="q1",
            video_path="a.mp4",
            question="What is on the table?",
            option0="a cup",
            option1="a book",
            option2="a pen",
            option3="N/A",
            option4="N/A",
            correct_choice=1,
            duration_group=15,
            question_category="TOS",
        ),
        dict(
            id="q2",
            video_path="b.mp4",
            question="Who enters?",
            option0="a man",
            option1="a woman",
            option2="a dog",
            option3="a cat",
            option4="a bird",
            correct_choice=4,
            duration_group=600,
            question_category="TOS",
        ),
        dict(
            id="q3",
            video_path="c.mp4",
            question="Where?",
            candidates=["inside", "outside"],
            correct_choice=0,
            duration_group=600,
            question_category="S2E",
        ),
    ]
    ann = write_json(str(tmp_path / "lvb_val.json"), recs)
    samples, res, table = evaluate(
        tmp_path,
        "longvideobench",
        ann,
        {"q1": "The best answer is B.", "q2": "D. a cat", "q3": "A"},
    )
    assert samples[0].prompt == (
        "What is on the table?\nA. a cup\nB. a book\nC. a pen\n"
        "Answer with the option's letter from the given choices directly.\n"
    )
    assert samples[0].max_new_tokens == 32 and samples[0].answer == "B"
    assert samples[0].video == str(tmp_path / "videos" / "a.mp4")
    assert res["overall"] == pytest.approx(200 / 3)
    cats = res["categories"]
    assert cats["duration_group=15"] == {"score": 100.0, "count": 1}
    assert cats["duration_group=600"] == {"score": 50.0, "count": 2}
    assert cats["question_category=TOS"] == {"score": 50.0, "count": 2}
    assert res["counts"] == {"samples": 3, "scored": 3, "failed": 0, "unparsed": 0}
    assert "longvideobench: 66.67" in table and "question_category=S2E" in table


def test_mlvu_is_the_unweighted_mean_of_the_seven_task_types(tmp_path):
    types = ["anomaly_reco", "count", "ego", "needle", "order", "plotQA"]  # no topic_reasoning
    recs, responses = [], {}
    for i, t in enumerate(types):
        for j in range(i + 1):  # type i has i + 1 questions, the first one answered right
            qid = f"{t}-{j}"
            recs.append(
                dict(
                    question_id=qid,
                    video_name=f"{t}.mp4",
                    task_type=t,
                    answer="A",
                    question=f"{qid}?\n(A) yes\n(B) no",
                )
            )
            responses[qid] = "A) yes" if j == 0 else "B) no"
    ann = write_jsonl(str(tmp_path / "mlvu.jsonl"), recs)
    samples, res, _ = evaluate(tmp_path, "mlvu", ann, responses)
    assert (
        samples[0].prompt == "anomaly_reco-0?\n(A) yes\n(B) no\nOnly give the best option.\n"
        "Best option: ("
    )
    per_type = [100 / (i + 1) for i in range(6)] + [0.0]  # a type with no samples scores 0
    assert res["overall"] == pytest.approx(sum(per_type) / 7)
    assert res["categories"]["topic_reasoning"] == {"score": 0.0, "count": 0}
    assert res["categories"]["order"]["score"] == pytest.approx(20.0)


def test_mlvu_rejects_an_unknown_task_type(tmp_path):
    ann = write_jsonl(
        str(tmp_path / "m.jsonl"),
        [dict(video_name="a.mp4", task_type="summary", answer="A", question="?")],
    )
    with pytest.raises(ValueError, match=r"m\.jsonl:1: task_type 'summary'"):
        load_samples(get_task("mlvu"), ann, str(tmp_path))


@pytest.mark.parametrize(
    "task, quirk, want",
    [
        ("timescope", False, 100.0),
        ("longtimescope", True, 50.0),
        ("longtimescope", False, 100.0),
    ],
)
def test_timescope_verbatim_input_and_the_prefix_quirk_flag(tmp_path, task, quirk, want):
    recs = [
        dict(id="1", video="v1.mp4", input="Q1?\n(A) x\n(B) y", answer="A", type="QA", length=60),
        dict(
            id="2", video="v2.mp4", input="Q2?\n(A) x\n(B) y", answer="c", type="OCR", length=3600
        ),
    ]
    os.makedirs(tmp_path / "videos")
    (tmp_path / "videos" / "v2.mkv").write_bytes(b"")  # upstream falls back to .mkv
    ann = write_jsonl(str(tmp_path / "ts.jsonl"), recs)
    samples, res, _ = evaluate(
        tmp_path, task, ann, {"1": "Best option: A", "2": "C"}, longtimescope_prefix_quirk=quirk
    )
    assert samples[0].prompt == "Q1?\n(A) x\n(B) y" and samples[0].max_new_tokens == 16
    assert samples[1].video.endswith("v2.mkv")
    assert res["overall"] == want
    assert set(res["categories"]) == {
        "length=60",
        "length=60/type=QA",
        "length=3600",
        "length=3600/type=OCR",
    }


def test_tomato_template_and_scores_by_type(tmp_path):
    recs = [
        dict(
            id="t1",
            video_path="human/1.mp4",
            question="Which way does it turn?",
            options=["clockwise", "counter-clockwise"],
            answer=1,
            reason_type="rotation",
            demonstration_type="human",
        ),
        dict(
            id="t2",
            video_path="object/2.mp4",
            question="How many times?",
            options=["1", "2", "3"],
            answer=0,
            reason_type="count",
            demonstration_type="object",
        ),
    ]
    ann = write_json(str(tmp_path / "tomato.json"), recs)
    samples, res, _ = evaluate(tmp_path, "tomato", ann, {"t1": "B", "t2": "I cannot tell"})
    p = samples[0].prompt
    assert p.startswith("You will be provided with 16 separate frames uniformly sampled from")
    assert (
        "<question> \nWhich way does it turn? \n</question>\n\n<options> \n"
        "{'A': 'clockwise', 'B': 'counter-clockwise'} \n</options>\n" in p
    )
    assert p.endswith("DO NOT GENERATE ANSWER SUCH AS 'NOT POSSIBLE TO DETERMINE.' \n")
    assert samples[0].max_new_tokens == 1024
    assert res["overall"] == 100.0  # the fallback "A" is t2's answer
    assert res["counts"]["unparsed"] == 1
    assert res["categories"]["reason_type=rotation"] == {"score": 100.0, "count": 1}


def test_vsibench_averages_the_direction_types_before_the_overall_mean(tmp_path):
    def mca(qid, qtype, gt):
        return dict(
            id=qid,
            dataset="scannet",
            scene_name=f"scene{qid}",
            question_type=qtype,
            question=f"Q{qid}?",
            options=["A. left", "B. right"],
            ground_truth=gt,
        )

    recs = [
        mca("1", "object_rel_direction_easy", "A"),
        mca("2", "object_rel_direction_medium", "A"),
        mca("3", "object_rel_direction_medium", "B"),
        mca("4", "object_rel_direction_hard", "A"),
        mca("5", "object_rel_direction_hard", "B"),
        mca("6", "route_planning", "B"),
        dict(
            id="7",
            dataset="arkitscenes",
            scene_name="s7",
            question_type="object_counting",
            question="How many chairs?",
            options=None,
            ground_truth="10",
        ),
    ]
    ann = write_jsonl(str(tmp_path / "vsi.jsonl"), recs)
    responses = {"1": "A.", "2": "B", "3": "A", "4": "a", "5": "A", "6": "B. right", "7": "11.3"}
    samples, res, _ = evaluate(tmp_path, "vsibench", ann, responses)
    assert samples[0].prompt == (
        "These are frames of a video.\nQ1?\nOptions:\nA. left\n"
        "B. right\nAnswer with the option's letter from the given "
        "choices directly."
    )
    assert samples[6].prompt == (
        "These are frames of a video.\nHow many chairs?\nPlease "
        "answer the question using a single word or phrase."
    )
    assert samples[0].video == str(tmp_path / "videos" / "scannet" / "scene1.mp4")
    cats = {k: v["score"] for k, v in res["categories"].items()}
    # easy 100, medium 0, hard 50 -> 50; counting MRA(11.3, 10) = 0.8; route planning 100
    assert cats == pytest.approx(
        {
            "object_rel_direction_accuracy": 50.0,
            "object_counting_MRA:.5:.95:.05": 80.0,
            "route_planning_accuracy": 100.0,
        }
    )
    assert res["overall"] == pytest.approx((50 + 80 + 100) / 3)


def test_generic_jsonl_multiple_choice(tmp_path):
    recs = [
        dict(
            id="a",
            video="x.mp4",
            question="Colour?",
            options=["red", "blue"],
            answer="b",
            category="colour",
        ),
        dict(
            id="b",
            video="y.mp4",
            question="Shape?",
            options=["square", "circle", "star"],
            answer="C",
        ),
    ]
    ann = write_jsonl(str(tmp_path / "mc.jsonl"), recs)
    samples, res, _ = evaluate(tmp_path, "jsonl", ann, {"a": "The answer is B", "b": "D"})
    assert samples[0].answer == "B"
    assert res["overall"] == 50.0 and res["counts"]["unparsed"] == 1  # D is no option of b
    assert res["categories"] == {"category=colour": {"score": 100.0, "count": 1}}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"video": "x.mp4", "question": "?", "options": ["a", "b"]}, "missing field 'answer'"),
        ({"video": "x.mp4", "question": "?", "options": ["a", "b"], "answer": "C"}, "answer 'C'"),
    ],
)
def test_a_malformed_record_fails_naming_the_file_and_line(tmp_path, bad, match):
    good = {"video": "x.mp4", "question": "?", "options": ["a", "b"], "answer": "A"}
    ann = write_jsonl(str(tmp_path / "mc.jsonl"), [good, bad])
    with pytest.raises(ValueError, match=rf"mc\.jsonl:2: .*{match}"):
        load_samples(get_task("jsonl"), ann, str(tmp_path))


@pytest.mark.parametrize("task", ["needle", "counting", "order"])
def test_synthetic_tasks_read_what_the_generator_writes(tmp_path, task):
    cfg = SyntheticConfig(num_frames=48, height=32, width=32, event_frames=2)
    ann = write_dataset(tmp_path / "videos", task=task, num_videos=3, cfg=cfg, seed=1)
    t = get_task(task)
    samples = load_samples(t, ann, str(tmp_path / "videos"))
    assert [os.path.exists(s.video) for s in samples] == [True] * 3
    assert all(not s.prompt.startswith("<video>") and "?" in s.prompt for s in samples)
    right = {
        "needle": lambda a: f"It is {a}.",
        "order": lambda a: f"The {a} one came first.",
        "counting": lambda a: (
            f"{['zero', 'one', 'two', 'three', 'four', 'five', 'six'][int(a)]} times"
        ),
    }
    for s in samples:
        assert t.score(s, right[task](s.answer)).score == 1.0
        assert t.score(s, "I don't know").score == 0.0
    if task == "counting":
        s = samples[0]
        assert t.score(s, f"{int(s.answer) + 1}").score == 0.0
        assert t.score(s, f"{s.answer}").score == 1.0


# ------------------------------------------------------------------------------ runner


def test_a_failed_video_is_reported_and_counted_never_fatal(tmp_path):
    recs = [
        dict(id=str(i), video=f"{i}.mp4", question=f"Q{i}?", options=["a", "b"], answer="A")
        for i in range(4)
    ]
    ann = write_jsonl(str(tmp_path / "mc.jsonl"), recs)
    task = get_task("jsonl")
    samples = load_samples(task, ann, str(tmp_path))

    def predict(video: str, prompt: str, max_new_tokens: int) -> str:
        if video.endswith("2.mp4"):
            raise VideoError(f"{video}: InvalidDataError: corrupt")
        return "A"

    progress = io.StringIO()
    res = run_eval(
        task,
        samples,
        predict,
        tmp_path / "out",
        progress=progress,
        table=io.StringIO(),
        settings={"fps": 1.0},
    )
    assert res["counts"] == {"samples": 4, "scored": 3, "failed": 1, "unparsed": 0}
    assert res["overall"] == 100.0
    assert res["failed_videos"] == [
        {
            "id": "2",
            "video": str(tmp_path / "2.mp4"),
            "error": f"{tmp_path / '2.mp4'}: InvalidDataError: corrupt",
        }
    ]
    assert res["settings"] == {"fps": 1.0}
    log = progress.getvalue().replace("\r", "\n").splitlines()
    # the failure is a line of its own above the tqdm bar, which ends at 4/4
    assert (
        f"failed video {tmp_path / '2.mp4'} (sample 2): {tmp_path / '2.mp4'}: "
        "InvalidDataError: corrupt" in log
    )
    assert "4/4" in [line for line in log if line.strip()][-1]
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[2])["error"].endswith("corrupt")


def test_a_run_that_scores_nothing_has_no_score(tmp_path):
    recs = [dict(id="0", video="0.mp4", question="Q?", options=["a", "b"], answer="A")]
    task = get_task("jsonl")
    samples = load_samples(task, write_jsonl(str(tmp_path / "mc.jsonl"), recs), str(tmp_path))

    def predict(video: str, prompt: str, max_new_tokens: int) -> str:
        raise VideoError(f"{video}: FileNotFoundError")

    table = io.StringIO()
    res = run_eval(task, samples, predict, tmp_path / "out", progress=io.StringIO(), table=table)
    assert res["overall"] is None
    assert json.loads((tmp_path / "out" / "results.json").read_text())["overall"] is None
    assert table.getvalue().startswith("jsonl: nothing scored  (0 scored, 1 failed videos")


def test_other_errors_stop_the_run(tmp_path):
    task = get_task("jsonl")
    sample = Sample("1", "v.mp4", "Q?", 8, "A", {"choices": "AB", "groups": []})

    def predict(video: str, prompt: str, max_new_tokens: int) -> str:
        raise RuntimeError("model bug")

    with pytest.raises(RuntimeError, match="model bug"):
        run_eval(task, [sample], predict, tmp_path, progress=io.StringIO(), table=io.StringIO())


def test_limit_takes_the_first_samples(tmp_path):
    recs = [
        dict(id=str(i), video="v.mp4", question=f"Q{i}", options=["a", "b"], answer="A")
        for i in range(5)
    ]
    ann = write_jsonl(str(tmp_path / "mc.jsonl"), recs)
    got = load_samples(get_task("jsonl"), ann, str(tmp_path), limit=2)
    assert [s.id for s in got] == ["0", "1"]
    assert np.all([s.max_new_tokens == 32 for s in got])


@pytest.mark.parametrize(
    "response, want",
    [
        ("<think>hmm</think><answer> B </answer>", "B"),
        ("so the count is \\boxed{ 7 }.", "7"),
        ("A. the cup", "A. the cup"),
    ],
)
def test_reasoning_answer_extraction(response, want):
    assert parsers.reasoning_answer(response) == want

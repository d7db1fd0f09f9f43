"""dsv3.tasks: verifiers and rewards of `add` and `countdown`, the held-out split, SFT records, the registry
and module:function loading."""

import json
import random
import sys
import textwrap

import pytest

from dsv3.tasks import (
    AddTask,
    CountdownTask,
    Problem,
    Task,
    TaskRegistry,
    get_task,
    load_reward,
    parse_equation,
    solve,
    split_response,
)
from dsv3.tasks.distill import write_jsonl
from dsv3.train.sft_data import read_sft_records

# ---------------------------------------------------------------- answer format


def test_split_response():
    assert split_response("  42 ") == (None, "42")
    assert split_response("<think>\nsum it\n</think>\n42") == ("sum it", "42")
    assert split_response("<think>unclosed 42") is None
    assert split_response("stray </think> 42") is None
    assert split_response("<think>a</think><think>b</think>42") is None
    assert split_response("pre <think>a</think>42") is None


# ---------------------------------------------------------------- add


def test_add_reward_correct_wrong_malformed():
    task = AddTask(digits=3)
    p = task.problem(457, 368)
    assert p.answer == "825" and p.prompt == "What is 457+368?"
    for good in ("825", " 825\n", "<think>\n7+8=15\n</think>\n825", "<think></think>825"):
        assert task.verify(p, good) and task.reward(p, good) == 1.0, good
    for wrong in ("824", "<think>hmm</think>\n-825", "0825 "[:-1] + "6"):
        assert task.well_formed(wrong) and not task.verify(p, wrong) and task.reward(p, wrong) == 0.1, wrong
    for bad in ("", "825 apples", "eight hundred", "<think>825", "<think>x</think>", "8 25", "825</think>"):
        assert not task.well_formed(bad) and task.reward(p, bad) == 0.0, bad


def test_add_reasoning_is_correct_column_addition():
    task = AddTask(digits=4)
    for p in task.split("train", 50):
        text = task.reference_response(p, reasoning=True)
        assert task.reward(p, text) == 1.0
        reasoning, answer = split_response(text)
        lines = reasoning.splitlines()
        assert len(lines) >= 4
        digits = [int(line.split("write ")[1].split()[0]) for line in lines if "write" in line]
        carry_line = [line for line in lines if "leading digit" in line]
        lead = str(int(carry_line[0].split()[-1])) if carry_line else ""
        assert int(lead + "".join(map(str, reversed(digits)))) == int(answer)
    assert task.reasoning(task.problem(999, 1)) == (
        "9+1+0=10 write 0 carry 1\n9+0+1=10 write 0 carry 1\n9+0+1=10 write 0 carry 1\n"
        "carry 1 gives the leading digit 1"
    )


def test_add_digits_setting():
    for d in (1, 2, 5):
        for p in AddTask(digits=d).split("train", 20):
            a, b = p.data["a"], p.data["b"]
            assert len(str(a)) == len(str(b)) == d
    with pytest.raises(ValueError, match="digits"):
        AddTask(digits=0)


# ---------------------------------------------------------------- countdown


def test_parse_equation_is_a_parser_not_eval():
    eq = parse_equation("(50 - 25) * 3 + 7 = 82")
    assert eq.numbers == (50, 25, 3, 7) and eq.value == 82 and eq.rhs == 82
    assert parse_equation("6/4").value == pytest.approx(1.5)
    assert parse_equation("3/(2-2)").value is None  # division by zero: well formed, no value
    bad_inputs = ("__import__('os')", "2**10", "3 +", "(3+4", "3+4)", "1 = 2 = 3", "x+1", "-3+5", "3 4")
    for bad in bad_inputs:
        assert parse_equation(bad) is None, bad
    assert parse_equation("") is None and parse_equation("2=") is None
    assert parse_equation("1+" * 200 + "1") is None  # over the length cap


def test_countdown_verifier():
    task = CountdownTask()
    p = task.problem([3, 7, 25, 50], 82)
    assert p.answer is not None and task.verify(p, p.answer)
    assert task.reward(p, "(50-25)*3+7") == 1.0
    assert task.reward(p, "<think>\n50-25=25\n25*3=75\n75+7=82\n</think>\n(50-25)*3+7 = 82") == 1.0
    assert task.reward(p, "7+(50-25)*3") == 1.0  # any order
    wrong = {
        "50+25+3+7": "right numbers, wrong value",
        "(50-25)*3+7 = 83": "wrong right-hand side",
        "(50-25)*3+7+7-7": "a number used more than once",
        "(50-25)*3+7-1+1": "numbers that are not given",
        "(50-25)*3+7*1": "an extra number",
        "(50+32)": "numbers missing and made up",
        "25*3+7": "a number missing",
        "3/(50-50)+25+7": "division by zero",
    }
    for resp, why in wrong.items():
        assert task.well_formed(resp) and task.reward(p, resp) == 0.1, why
    for resp in ("82", "(50-25)*3+7 apples", "<think>(50-25)*3+7", "import os"):
        assert task.reward(p, resp) == (0.1 if resp == "82" else 0.0), resp


def test_countdown_unreachable_target():
    task = CountdownTask(min_numbers=3, max_numbers=3)
    assert solve([1, 1, 1], 100) is None
    p = task.problem([1, 1, 1], 100)
    assert p.answer is None
    for resp in ("1+1+1", "(1+1)*1", "1*1*1 = 100"):
        assert task.reward(p, resp) == 0.1
    with pytest.raises(ValueError, match="no reference answer"):
        task.reference_response(p)


def test_countdown_problems_are_reachable_and_reasoned():
    task = CountdownTask()
    ps = task.split("train", 60) + task.split("test", 20)
    assert {len(p.data["numbers"]) for p in ps} == {3, 4}
    for p in ps:
        assert 1 <= p.data["target"] <= 100 and all(1 <= n <= 10 for n in p.data["numbers"])
        assert task.verify(p, p.answer), p
        assert task.reward(p, task.reference_response(p, reasoning=True)) == 1.0
        assert solve(p.data["numbers"], p.data["target"]) is not None
        assert task.verify(p, solve(p.data["numbers"], p.data["target"]))
        assert len(task.reasoning(p).splitlines()) == len(p.data["numbers"]) - 1


# ---------------------------------------------------------------- held-out split


@pytest.mark.parametrize("spec", ["add:digits=2", "add:digits=3", "countdown"])
def test_heldout_split_disjoint_and_deterministic(spec):
    task = get_task(spec)
    test = task.split("test", 40)
    assert [p.key for p in test] == [p.key for p in get_task(spec).split("test", 40)]
    assert len({p.key for p in test}) == 40
    train_keys = {p.key for s in range(3) for p in task.split("train", 300, seed=s)}
    rng = random.Random(123)
    train_keys |= {task.sample(rng).key for _ in range(300)}
    assert not train_keys & {p.key for p in test}
    assert all(task.split_of(p) == "test" for p in test)
    # the split is a function of the problem: commuted operands / reordered numbers share it
    if isinstance(task, AddTask):
        p = test[0]
        swapped = task.problem(p.data["b"], p.data["a"])
        assert task.split_of(swapped) == "test" and swapped.key == p.key
    else:
        p = test[0]
        shuffled = task.problem(list(reversed(p.data["numbers"])), p.data["target"])
        assert task.split_of(shuffled) == "test"


def test_split_errors():
    task = AddTask(digits=1)  # 55 distinct problems, ~10% held out
    with pytest.raises(ValueError, match="only .* distinct test problems"):
        task.split("test", 50)
    with pytest.raises(ValueError, match="split must be one of"):
        task.split("validation", 3)
    with pytest.raises(ValueError, match="heldout"):
        AddTask(heldout=1.5)


def test_sft_records_are_trl_messages(tmp_path):
    task = get_task("add:digits=2")
    recs = task.sft_records(8, reasoning=True)
    assert len(recs) == 8
    for r in recs:
        json.loads(json.dumps(r))
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"].startswith("<think>\n") and "</think>\n" in assistant["content"]
    plain = task.sft_records(8)
    assert [r["messages"][0] for r in plain] == [r["messages"][0] for r in recs]
    assert all("<think>" not in r["messages"][1]["content"] for r in plain)
    held = {p.prompt for p in task.split("test", 10)}
    assert not held & {r["messages"][0]["content"] for r in task.sft_records(200)}
    raw = task.sft_records(8, chat=False)  # TRL prompt-completion records for a base model
    assert [r["prompt"] for r in raw] == [r["messages"][0]["content"] for r in plain]
    assert [r["completion"] for r in raw] == [" " + r["messages"][1]["content"] for r in plain]
    write_jsonl(tmp_path / "raw.jsonl", raw)
    assert {r.kind for r in read_sft_records(tmp_path / "raw.jsonl")} == {"prompt_completion"}


# ---------------------------------------------------------------- registry and module:function


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks_mod.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from typing import ClassVar
            from dsv3.tasks import AddTask

            @dataclass
            class Sub(AddTask):
                name: ClassVar[str] = "sub"

            def make():
                return Sub(digits=2)

            def not_a_task():
                return 3

            def length_reward(problem, response):
                return float(response.strip() == problem.answer)

            VALUE = 1
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_tasks_mod"
    sys.modules.pop("my_tasks_mod", None)


def test_registry(user_module):
    assert isinstance(get_task("add"), AddTask) and get_task("add:digits=5").digits == 5
    cd = get_task("countdown:min_numbers=3,max_numbers=3,max_target=50")
    assert (cd.max_numbers, cd.max_target) == (3, 50)
    reg = TaskRegistry.builtin()
    reg.register("add2", lambda **kw: AddTask(digits=2, **kw))
    assert reg.get("add2").digits == 2 and "add2" in reg.names
    assert "add2" not in TaskRegistry.builtin().names  # no global state
    with pytest.raises(ValueError, match="already registered"):
        reg.register("add", AddTask)
    with pytest.raises(ValueError, match="unknown task 'mul'.*add.*countdown"):
        get_task("mul")
    with pytest.raises(ValueError, match="bad settings.*digitz"):
        get_task("add:digitz=3")
    with pytest.raises(ValueError, match="key=value"):
        get_task("add:digits")
    with pytest.raises(ValueError, match="digits must be"):
        get_task("add:digits=abc")
    task = get_task(f"{user_module}:make")
    assert isinstance(task, Task) and task.name == "sub" and task.digits == 2
    with pytest.raises(ValueError, match="did not produce a dsv3.tasks.Task"):
        get_task(f"{user_module}:not_a_task")


def test_load_reward(user_module):
    fn = load_reward(f"{user_module}:length_reward")
    p = Problem(task="x", key="1", prompt="q", answer="7")
    assert fn(p, " 7 ") == 1.0 and fn(p, "8") == 0.0
    with pytest.raises(ValueError, match="module:function"):
        load_reward("no_colon")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz'"):
        load_reward("no_such_mod_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward(f"{user_module}:missing")
    with pytest.raises(ValueError, match="not callable"):
        load_reward(f"{user_module}:VALUE")

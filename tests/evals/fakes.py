"""Stand-in models that speak the evaluation protocol, and hand-made benchmark items."""

from __future__ import annotations

import json
import os


class OracleMC:
    """Knows the right continuation for each context (looked up by the context's last item)."""

    def __init__(self, answer_for):
        self.answer_for = answer_for  # context -> the right continuation
        self.calls = 0

    def loglikelihood(self, requests):
        self.calls += 1
        return [(0.0, True) if cont == self.answer_for(ctx) else (-7.0, False) for ctx, cont in requests]

    def generate(self, prompts, params):
        raise AssertionError("a multiple-choice task must not generate")


class ConstantMC:
    def loglikelihood(self, requests):
        return [(-1.0, False) for _ in requests]

    def generate(self, prompts, params):
        raise AssertionError("a multiple-choice task must not generate")


class ScriptedGen:
    """Answers each prompt with ``reply(prompt)``; records what it was asked."""

    def __init__(self, reply):
        self.reply = reply
        self.prompts, self.params = [], []

    def loglikelihood(self, requests):
        raise AssertionError("a generation task must not score")

    def generate(self, prompts, params):
        self.prompts += list(prompts)
        self.params += list(params)
        return [self.reply(p) for p in prompts]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------- hand-made items
def mmlu_items():
    test, dev = [], []
    for s, subject in enumerate(("astronomy", "high_school_physics")):
        for i in range(4):
            test.append({"subject": subject, "question": f"{subject} question {i}: which is right?",
                         "choices": [f"opt{i}{k}" for k in range(4)], "answer": (i + s * 2) % 4})
        for i in range(5):
            dev.append({"subject": subject, "question": f"{subject} dev {i}?", "choices": ["w", "x", "y", "z"],
                        "answer": i % 4})
    return test, dev


def hellaswag_items(n=30):
    return [{"idx": i, "activity_label": f"Activity {i % 3}", "ctx": f"Person {i} does thing {i}. then they",
             "endings": [f"ending {i}-{k} here." for k in range(4)], "label": i % 4} for i in range(n)]


GSM8K_ITEMS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7",
     "final": "7"},
    {"question": "A car costs 1234.5 dollars after tax. What is the price?", "answer": "#### 1234.5",
     "final": "1234.5"},
    {"question": "It is 5 degrees and drops by 12. What is the temperature?", "answer": "#### -7", "final": "-7"},
    {"question": "Sam earns 2,000 a week for 3 weeks. Total?", "answer": "#### 6000", "final": "6000"},
]
# how the oracle phrases each answer: equivalent, not identical, to the reference
GSM8K_REPLIES = [" 3 + 4 = 7. The answer is 7.", " So it costs $1,234.50. The answer is $1,234.50.",
                 " 5 - 12 = -7. The answer is -7.", " 2000 * 3 = 6000. The answer is 6,000."]


def gsm8k_shots(k=8):
    return [{"question": f"Exemplar question {i}?", "answer": f"Reasoning {i}. The answer is {i}.", "final": str(i)}
            for i in range(k)]


MATH_ITEMS = [
    {"problem": "What is $1/2$ as a fraction?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}",
     "subject": "Algebra", "level": 1},
    {"problem": "Expand $(x^2+1)$.", "solution": "$\\boxed{x^2+1}$", "answer": "x^2+1", "subject": "Algebra",
     "level": 2},
    {"problem": "Which choice?", "solution": "$\\boxed{\\text{(A)}}$", "answer": "\\text{(A)}", "subject": "Geometry",
     "level": 1},
    {"problem": "Angle?", "solution": "$\\boxed{30^\\circ}$", "answer": "30^\\circ", "subject": "Geometry", "level": 3},
    {"problem": "Domain?", "solution": "$\\boxed{[2,5)}$", "answer": "[2,5)", "subject": "Precalculus", "level": 4},
]
MATH_REPLIES = ["$0.5$", "$1+x^{2}$", "$A$", "$30$", "$[2, 5)$"]


def math_shots(k=4):
    return [{"problem": f"Exemplar {i}?", "solution": f"Easy. Final Answer: The final answer is ${i}$. I hope it is "
             f"correct.", "answer": str(i)} for i in range(k)]


def write_all(data_dir):
    """Every benchmark's files, hand-made, in the offline data folder's schemas."""
    test, dev = mmlu_items()
    write_jsonl(os.path.join(data_dir, "mmlu_test.jsonl"), test)
    write_jsonl(os.path.join(data_dir, "mmlu_dev.jsonl"), dev)
    write_jsonl(os.path.join(data_dir, "hellaswag_val.jsonl"), hellaswag_items())
    write_jsonl(os.path.join(data_dir, "gsm8k_test.jsonl"), GSM8K_ITEMS)
    write_jsonl(os.path.join(data_dir, "gsm8k_fewshot_cot8.jsonl"), gsm8k_shots())
    write_jsonl(os.path.join(data_dir, "math_test.jsonl"), MATH_ITEMS)
    write_jsonl(os.path.join(data_dir, "math_fewshot_minerva4.jsonl"), math_shots())
    write_jsonl(os.path.join(data_dir, "HumanEval.jsonl"), [
        {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
         "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
         "entry_point": "add"}])
    return data_dir

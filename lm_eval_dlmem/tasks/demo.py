"""Two small offline tasks for the embedded demo and the CLI tests: a short-answer generation task
(`dlmem_demo_gen`, exact match) and a multiple-choice task (`dlmem_demo_mc`, loglikelihood).
The data is written here, so they run with no network and no files outside the package."""

from __future__ import annotations

FACTS = [
    ("Mary went to the kitchen. John went to the garden.", "Where is Mary?", "kitchen"),
    ("The box is red. The ball is blue.", "What color is the ball?", "blue"),
    ("Sandra moved to the office. Daniel moved to the hallway.", "Where is Daniel?", "hallway"),
    ("The key is 4821. The door is 17.", "What is the key?", "4821"),
    ("Fred has the apple. Bill has the milk.", "Who has the milk?", "Bill"),
    ("The sun is yellow. The grass is green.", "What color is the grass?", "green"),
    ("Anna travelled to the bedroom. Tom travelled to the bathroom.", "Where is Anna?", "bedroom"),
    ("The cat sleeps on the mat. The dog sleeps on the rug.", "Where does the dog sleep?", "rug"),
]

CHOICES = ["kitchen", "blue", "hallway", "4821", "Bill", "green", "bedroom", "rug"]


def load_gen(**kwargs):
    import datasets

    rows = [{"context": c, "question": q, "answer": a} for c, q, a in FACTS]
    return {"test": datasets.Dataset.from_list(rows)}


def load_mc(**kwargs):
    import datasets

    rows = []
    for i, (c, q, a) in enumerate(FACTS):
        wrong = [x for x in CHOICES if x != a]
        options = sorted({a, wrong[i % len(wrong)], wrong[(i + 3) % len(wrong)]})
        rows.append({"context": c, "question": q, "choices": options, "label": options.index(a)})
    return {"test": datasets.Dataset.from_list(rows)}

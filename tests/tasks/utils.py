"""Data for the CLI test tasks (resolved by lm-eval as <yaml dir>/utils.py)."""

import datasets

ROWS = [
    ("Mary went to the kitchen.", "Where is Mary?", "kitchen", ["garden", "kitchen", "office"]),
    ("The ball is blue.", "What color is the ball?", "blue", ["blue", "green", "red"]),
    ("Daniel moved to the hallway.", "Where is Daniel?", "hallway", ["bathroom", "hallway", "office"]),
    ("The key is 4821.", "What is the key?", "4821", ["17", "4821", "99"]),
    ("Bill has the milk.", "Who has the milk?", "Bill", ["Bill", "Fred", "Mary"]),
    ("The grass is green.", "What color is the grass?", "green", ["blue", "green", "yellow"]),
]


def load(**kwargs):
    return {"test": datasets.Dataset.from_list(
        [{"context": c, "question": q, "answer": a, "choices": ch, "label": ch.index(a)} for c, q, a, ch in ROWS]
    )}

"""An offline generator of bAbI-style stories for BABILong qa1-qa5.

The bAbI data (facebook/babi_qa) is not on PyPI, so BABILong's facts are simulated here with the
vocabulary of the original tasks (its people, rooms and objects, which are also BABILong's
answer labels) and its sentence patterns:

- qa1 single supporting fact: people move; "Where is Mary?" -> her last room.
- qa2 two supporting facts: people move, pick up and drop objects; "Where is the milk?".
- qa3 three supporting facts: "Where was the apple before the kitchen?" -> the room the apple
  was in just before it reached the kitchen.
- qa4 two-argument relations: two facts "The office is north of the kitchen."; "What is north of
  the kitchen?" or "What is the office north of?".
- qa5 three-argument relations: people move, take, drop and give objects; questions about the
  last hand-over ("Who gave the milk to Bill?", "Who did Fred give the milk to?", "What did Fred
  give to Bill?", "Who received the milk?", "Who gave the milk?").

Every story has one correct answer, which is always one of `metrics.TASK_LABELS[task]`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PEOPLE_QA5 = ("Bill", "Fred", "Jeff", "Mary")
ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE = ("moved to", "went to", "travelled to", "journeyed to", "went back to")
GET = ("got", "grabbed", "picked up", "took")
DROP = ("dropped", "discarded", "put down", "left")
GIVE = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")


@dataclass(frozen=True)
class Story:
    facts: tuple[str, ...]
    question: str
    answer: str


class World:
    """People in rooms carrying objects; each action returns its sentence."""

    def __init__(self, rng: random.Random, people: tuple[str, ...]):
        self.rng, self.people = rng, people
        self.where: dict[str, str] = {}  # person -> room
        self.holder: dict[str, str] = {}  # object -> person
        self.dropped: dict[str, str] = {}  # object -> room it lies in
        self.history: dict[str, list[str]] = {o: [] for o in OBJECTS}  # rooms each object passed through

    def _note(self, obj: str) -> None:
        room = self.where[self.holder[obj]] if obj in self.holder else self.dropped.get(obj)
        if room and (not self.history[obj] or self.history[obj][-1] != room):
            self.history[obj].append(room)

    def move(self) -> str:
        person = self.rng.choice(self.people)
        room = self.rng.choice([r for r in ROOMS if r != self.where.get(person)])
        self.where[person] = room
        for obj, who in self.holder.items():
            if who == person:
                self._note(obj)
        return f"{person} {self.rng.choice(MOVE)} the {room}."

    def take(self) -> str | None:
        placed = [p for p in self.people if p in self.where]
        free = [o for o in OBJECTS if o not in self.holder]
        if not placed or not free:
            return None
        person, obj = self.rng.choice(placed), self.rng.choice(free)
        if obj in self.dropped and self.dropped[obj] != self.where[person]:
            return None  # it lies in another room
        self.holder[obj] = person
        self.dropped.pop(obj, None)
        self._note(obj)
        return f"{person} {self.rng.choice(GET)} the {obj} there."

    def drop(self) -> str | None:
        if not self.holder:
            return None
        obj = self.rng.choice(sorted(self.holder))
        person = self.holder.pop(obj)
        self.dropped[obj] = self.where[person]
        return f"{person} {self.rng.choice(DROP)} the {obj}."

    def give(self) -> tuple[str, tuple[str, str, str]] | None:
        held = [o for o in sorted(self.holder)
                if any(p != self.holder[o] and self.where.get(p) == self.where[self.holder[o]] for p in self.people)]
        if not held:
            return None
        obj = self.rng.choice(held)
        giver = self.holder[obj]
        receiver = self.rng.choice([p for p in self.people if p != giver and self.where.get(p) == self.where[giver]])
        self.holder[obj] = receiver
        return f"{giver} {self.rng.choice(GIVE)} the {obj} to {receiver}.", (giver, obj, receiver)

    def object_room(self, obj: str) -> str | None:
        return self.where[self.holder[obj]] if obj in self.holder else self.dropped.get(obj)


def _qa1(rng: random.Random) -> Story:
    world = World(rng, PEOPLE)
    facts = [world.move() for _ in range(rng.randint(2, 10))]
    person = rng.choice(sorted(world.where))
    return Story(tuple(facts), f"Where is {person}?", world.where[person])


def _object_story(rng: random.Random, steps: int, weights=(5, 3, 2)) -> tuple[World, list[str]]:
    world, facts = World(rng, PEOPLE), []
    while len(facts) < steps:
        action = rng.choices((world.move, world.take, world.drop), weights=weights)[0]
        sentence = action()
        if sentence:
            facts.append(sentence)
    return world, facts


def _qa2(rng: random.Random) -> Story:
    while True:
        world, facts = _object_story(rng, rng.randint(2, 20))
        known = [o for o in OBJECTS if world.history[o] and world.object_room(o)]
        if known:
            obj = rng.choice(known)
            return Story(tuple(facts), f"Where is the {obj}?", world.object_room(obj))


def _qa3(rng: random.Random) -> Story:
    while True:
        world, facts = _object_story(rng, rng.randint(4, 24), weights=(6, 3, 1))
        options = [(o, j) for o in OBJECTS for j, room in enumerate(world.history[o])
                   if j > 0 and world.history[o].count(room) == 1]
        if options:
            obj, j = rng.choice(options)
            place = world.history[obj][j]
            return Story(tuple(facts), f"Where was the {obj} before the {place}?", world.history[obj][j - 1])


def _qa4(rng: random.Random) -> Story:
    a, b, c = rng.sample(ROOMS, 3)
    d1 = rng.choice(sorted(OPPOSITE))
    d2 = rng.choice([d for d in OPPOSITE if d not in (d1, OPPOSITE[d1])])
    relations = [(a, d1, b), (c, d2, b) if rng.random() < 0.5 else (b, d2, c)]
    rng.shuffle(relations)
    facts = tuple(f"The {x} is {d} of the {y}." for x, d, y in relations)
    x, d, y = rng.choice(relations)
    if rng.random() < 0.5:
        return Story(facts, f"What is {d} of the {y}?", x)
    return Story(facts, f"What is the {x} {d} of?", y)


def _qa5(rng: random.Random) -> Story:
    while True:
        world, facts, gives = World(rng, PEOPLE_QA5), [], []
        for _ in range(rng.randint(2, 20)):
            action = rng.choices(("move", "take", "drop", "give"), weights=(4, 3, 1, 3))[0]
            result = getattr(world, action)()
            if isinstance(result, tuple):
                facts.append(result[0])
                gives.append(result[1])
            elif result:
                facts.append(result)
        if gives:
            return _qa5_question(rng, tuple(facts), gives)


def _qa5_question(rng: random.Random, facts: tuple[str, ...], gives: list[tuple[str, str, str]]) -> Story:
    giver, obj, receiver = gives[-1]
    asks = [(f"Who received the {obj}?", receiver), (f"Who gave the {obj}?", giver)]
    if sum(g[1] == obj and g[2] == receiver for g in gives) == 1:
        asks.append((f"Who gave the {obj} to {receiver}?", giver))
    if sum(g[0] == giver and g[1] == obj for g in gives) == 1:
        asks.append((f"Who did {giver} give the {obj} to?", receiver))
    if sum(g[0] == giver and g[2] == receiver for g in gives) == 1:
        asks.append((f"What did {giver} give to {receiver}?", obj))
    question, answer = rng.choice(asks)
    return Story(facts, question, answer)


_MAKERS = {"qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}


def make_story(task: str, rng: random.Random) -> Story:
    """One bAbI-style story for `task` ("qa1".."qa5")."""
    if task not in _MAKERS:
        raise ValueError(f"No offline generator for {task!r}; choose one of {', '.join(TASKS)}.")
    return _MAKERS[task](rng)

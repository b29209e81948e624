"""Campaign grouping and the Breidbart score, with an injected clock."""

import math

from maild.antispam.campaigns import Campaigns
from maild.textsig import normalise, signature, volatile_tokens

BASE = (
    "Dear {n}, our spring sale has started: 30% off all shoes and boots at "
    "https://shop.example/sale?u={n}{i} until May {i}. Reply to {n}@mail.example "
    "to unsubscribe from this newsletter. Kind regards, the shop team"
)
OTHER = (
    "Minutes of the board meeting: the budget for next year was approved, "
    "the roof repair is scheduled for March and the next meeting is on Tuesday"
)


def sig(text: str, name: str = ""):
    return signature(normalise(text, volatile_tokens([f"{name}@x.example"], [name])))


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_personalised_copies_are_one_campaign_and_score_adds_up():
    clock = Clock()
    c = Campaigns(clock=clock)
    for i, name in enumerate(["alice", "bob", "carol", "dave"]):
        camp = c.add("acme", sig(BASE.format(n=name, i=i), name), 30)
    assert len(c.customers["acme"].campaigns) == 1
    assert camp.score() == 4 * math.sqrt(30)
    _, with_next = c.score_with("acme", sig(BASE.format(n="erin", i=9), "erin"), 30)
    assert with_next == 5 * math.sqrt(30)


def test_different_text_and_other_customers_are_separate():
    c = Campaigns(clock=Clock())
    c.add("acme", sig(BASE.format(n="alice", i=1), "alice"), 10)
    assert c.find("acme", sig(OTHER)) is None
    assert c.find("other", sig(BASE.format(n="alice", i=1), "alice")) is None


def test_window_expires_copies():
    clock = Clock()
    c = Campaigns(clock=clock, window=3600)
    s = sig(BASE.format(n="a", i=1))
    c.add("acme", s, 100)
    clock.t = 3601
    camp, score = c.score_with("acme", s, 100)
    assert camp is not None and score == 10.0  # the old copy no longer counts


def test_memory_is_bounded():
    c = Campaigns(clock=Clock(), max_campaigns=10, max_customers=3)
    import random

    rnd = random.Random(7)
    words = [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(2000)
    ]
    for _ in range(50):
        c.add("acme", sig(" ".join(rnd.sample(words, 30))), 1)
    assert len(c.customers["acme"].campaigns) == 10
    assert sum(len(v) for v in c.customers["acme"].index.values()) <= 10 * 16
    for cust in ["a", "b", "c", "d"]:
        c.add(cust, sig(OTHER), 1)
    assert len(c.customers) == 3 and "acme" not in c.customers

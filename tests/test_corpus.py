"""The embedded corpus: deterministic, disjoint splits, the promised size, variety, unicode and correct facts."""

import collections
import datetime
import math
import re
import time

import pytest

from nanochat_jax import corpus


@pytest.fixture(scope="module")
def train_docs():
    start = time.perf_counter()
    docs = list(corpus.documents("train"))
    return docs, time.perf_counter() - start


@pytest.fixture(scope="module")
def val_docs():
    return list(corpus.documents("val"))


def test_deterministic_and_random_access(train_docs):
    docs, _ = train_docs
    assert [corpus.document("train", i) for i in (0, 17, len(docs) - 1)] == [docs[0], docs[17], docs[-1]]
    assert corpus.document("train", 5) == corpus.document("train", 5)
    assert corpus.document("train", 5, seed=1) != docs[5]
    assert list(corpus.documents("val", seed=1))[:3] == [corpus.document("val", i, seed=1) for i in range(3)]


def test_sizes_and_speed(train_docs, val_docs):
    docs, seconds = train_docs
    assert len(docs) == corpus.num_documents("train") and len(val_docs) == corpus.num_documents("val")
    train_bytes = sum(len(d.encode()) for d in docs)
    val_bytes = sum(len(d.encode()) for d in val_docs)
    assert 3_500_000 < train_bytes < 5_000_000
    assert 0.02 < val_bytes / train_bytes < 0.05
    assert seconds < 30.0  # (~2 s measured; guards a generator gone quadratic, not speed)
    assert all(50 < len(d) < 5000 for d in docs)


def test_splits_disjoint_and_no_duplicates(train_docs, val_docs):
    docs, _ = train_docs
    assert len(set(docs)) == len(docs)
    assert len(set(val_docs)) == len(val_docs)
    assert not set(docs) & set(val_docs)


def test_variety_and_unicode(train_docs):
    docs, _ = train_docs
    words = collections.Counter(w for d in docs[:1000] for w in re.findall(r"\w+", d))
    assert len(words) > 700
    text = "".join(docs[:1000])
    for s in ("é", "ø", "°C", "×", "🌧️", "猫", "Once upon a time", "Answer:", "Q: ", "Dear diary"):
        assert s in text, s
    # unigram byte entropy leaves room to learn: well above a trivial text, well below random bytes
    counts = collections.Counter(text.encode())
    total = sum(counts.values())
    entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
    assert 4.0 < entropy < 6.0


def test_facts_are_consistent(train_docs):
    docs, _ = train_docs
    text = "\n".join(docs)
    capitals = dict((c[0], c[1]) for c in corpus.COUNTRIES)
    found = re.findall(r"The capital of ([A-Z][\w ]*?) is ([A-Z][\w ]*?)\.", text)
    assert len(found) > 500
    assert all(capitals[c] == cap for c, cap in found)
    sums = re.findall(r"^(\d+) \+ (\d+) = (\d+)$", text, flags=re.M)
    assert len(sums) > 500 and all(int(a) + int(b) == int(c) for a, b, c in sums)
    products = re.findall(r"^(\d+) [×*x] (\d+) = (\d+)$", text, flags=re.M)
    assert len(products) > 200 and all(int(a) * int(b) == int(c) for a, b, c in products)
    dates = re.findall(r"today is (\w+), (\d+) (\w+) (\d{4})\.", text)
    assert len(dates) > 100
    for weekday, day, month, year in dates:
        assert datetime.datetime.strptime(f"{day} {month} {year}", "%d %B %Y").strftime("%A") == weekday


def test_bad_split_and_index():
    with pytest.raises(ValueError, match="unknown corpus split 'test'"):
        corpus.num_documents("test")
    with pytest.raises(IndexError, match="out of range"):
        corpus.document("val", corpus.num_documents("val"))


def test_indefinite_articles_fit_the_noun(train_docs):
    """'an owl', 'an insect' (the tables' nouns are all sounded as spelled): the corpus and the chat facts taught
    'a owl has 2 legs', 'the frog is a amphibian' a few hundred times."""
    from nanochat_jax.tasks.corpuschat import WorldFacts

    docs, _ = train_docs
    facts = WorldFacts(3000, "train")
    chats = [m["content"] for i in range(len(facts)) for m in facts[i]["messages"]]
    for texts in (docs, chats):
        text = "\n".join(texts)
        assert not re.findall(r"\b[Aa] [aeiou]\w*", text)
        assert "An owl has 2 legs." in text and re.search(r"\bis an (insect|amphibian|arachnid)\.", text)


def test_counted_nouns_agree_with_the_count(train_docs):
    """'There is 1 plum left', 'One fig costs 1 coin': the arithmetic stories taught 'There are 1 mangoes left'
    and 'has 1 apples' in ~4 % of corpus documents and word problems."""
    from nanochat_jax.tasks.corpuschat import WordProblems

    docs, _ = train_docs
    problems = WordProblems(3000, "train")
    chats = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
             for i in range(len(problems)) for m in problems[i]["messages"]]
    plurals = {f[1] for f in corpus.FOODS} | {"coins"}
    for texts in (docs, chats):
        text = "\n".join(texts)
        assert not [m for m in re.findall(r"(?<!\* )\b1 (\w+)", text) if m in plurals]  # not in "5 * 1 coins"
        assert not re.findall(r"\bare 1 ", text) and not re.findall(r"There is (?!1 )\d", text)
        assert re.search(r"There is 1 [a-z]+ left\.", text) and re.search(r"There are \d+ [a-z]+s left\.", text)
    assert re.search(r"costs 1 coin\.", "\n".join(chats)) and re.search(r"gets 1 coin of change\.", "\n".join(chats))


def test_weather_agrees_with_the_towns(train_docs, val_docs):
    """Sunport is 'a busy harbour town where it is always warm' and Frostholm 'a cold town high in the mountains':
    diaries said 'The weather in Sunport was snowy ❄️ and it was -8 °C' (~100 documents) and Frostholm 35 °C."""
    from nanochat_jax.tasks.corpuschat import SmallTalk

    docs, _ = train_docs
    text = "\n".join(docs + val_docs)
    temps = collections.defaultdict(list)
    for town, weather, temp in re.findall(r"The weather in (\w+) was (\w+) \S+ and it was (-?\d+) °C", text):
        temps[town].append(int(temp))
        assert weather != "snowy" or int(temp) <= 0
    assert min(temps["Sunport"]) >= 15 and max(temps["Frostholm"]) <= 10 and max(temps["Oakford"]) > 25
    talk = SmallTalk(3000, "train")
    chats = "\n".join(m["content"] for i in range(len(talk)) for m in talk[i]["messages"])
    for town_text in (text, chats):
        assert not re.search(r"snowy here in Sunport|in Sunport was snowy", town_text)
    sunport_people = {p[0] for p in corpus.PEOPLE if p[4] == "Sunport"}
    for doc in docs:  # a story's weather is its hero's town's
        for name, weather in re.findall(r"(\w+) was a \w+ who lived in \w+\.[^\n]*? the weather was (\w+), so \1", doc):
            assert not (name in sunport_people and weather == "snowy"), doc

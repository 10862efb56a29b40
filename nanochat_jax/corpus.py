"""The embedded corpus: a small synthetic text collection that is always available, even offline.

Every document is generated on demand from its own `random.Random(f"{seed}/{split}/{i}")`, so
`document(split, i)` is cheap random access (what a grain data source needs) and the corpus is
identical on every machine. The text comes from a fixed invented "world" (people, towns, countries,
animals, words in a few languages) rendered through templates: short stories, factual statements,
arithmetic with correct answers, lists, dialogues and diary entries with real calendar dates. The
facts never change between documents, so a tiny model can learn them and its validation loss drops
far below a unigram baseline. About 4 MB of train text and ~3 % as much validation text.

Licence: every word list, template and generated document here is written by the nanochat-jax
project and is distributed under the project's MIT licence.
"""

from __future__ import annotations

import datetime
import random
from typing import Iterator

NUM_DOCUMENTS = {"train": 3800, "val": 120}

# ---------------------------------------------------------------------------------------------
# The world: fixed tables that every document agrees with

# (name, pronoun, possessive, job, town, pet, pet name, favourite food)
PEOPLE = [
    ("Anna", "she", "her", "baker", "Bellmoor", "cat", "Pip", "apples"),
    ("Ben", "he", "his", "fisherman", "Saltmarsh", "dog", "Rufus", "bread"),
    ("Zoë", "she", "her", "painter", "Ravenhill", "parrot", "Kiwi", "cherries"),
    ("José", "he", "his", "carpenter", "Oakford", "horse", "Canela", "soup"),
    ("Mira", "she", "her", "teacher", "Bellmoor", "rabbit", "Clover", "carrots"),
    ("Tom", "he", "his", "farmer", "Greenvale", "goat", "Bramble", "cheese"),
    ("Chloé", "she", "her", "doctor", "Ravenhill", "cat", "Minou", "pears"),
    ("Leo", "he", "his", "sailor", "Saltmarsh", "parrot", "Captain", "oranges"),
    ("Ingrid", "she", "her", "librarian", "Frostholm", "owl", "Hoot", "honey"),
    ("Sam", "he", "his", "gardener", "Greenvale", "tortoise", "Pebble", "lettuce"),
    ("Renée", "she", "her", "musician", "Oakford", "dog", "Tempo", "grapes"),
    ("Björn", "he", "his", "blacksmith", "Frostholm", "horse", "Thunder", "porridge"),
    ("Lucía", "she", "her", "pilot", "Sunport", "cat", "Luna", "mangoes"),
    ("Omar", "he", "his", "shopkeeper", "Sunport", "dog", "Biscuit", "dates"),
    ("Nora", "she", "her", "scientist", "Copperton", "mouse", "Whiskers", "plums"),
    ("Felix", "he", "his", "postman", "Copperton", "dog", "Scout", "sausages"),
    ("Hana", "she", "her", "potter", "Willowbrook", "fish", "Bubbles", "rice"),
    ("Pablo", "he", "his", "cook", "Willowbrook", "cat", "Tigre", "tomatoes"),
    ("Søren", "he", "his", "builder", "Frostholm", "dog", "Bjørn", "fish"),
    ("Amara", "she", "her", "nurse", "Sunport", "parrot", "Sunny", "bananas"),
    ("Kai", "he", "his", "miner", "Copperton", "canary", "Goldie", "beans"),
    ("Elif", "she", "her", "tailor", "Ravenhill", "rabbit", "Snow", "figs"),
]

# (town, description, landmark)
TOWNS = {
    "Bellmoor": ("a quiet town on a green hill", "the old bell tower"),
    "Saltmarsh": ("a windy fishing village by the sea", "the lighthouse"),
    "Ravenhill": ("a town of narrow streets and tall houses", "the art museum"),
    "Oakford": ("a town beside a slow river", "the wooden bridge"),
    "Greenvale": ("a farming village in a wide valley", "the windmill"),
    "Frostholm": ("a cold town high in the mountains", "the frozen lake"),
    "Sunport": ("a busy harbour town where it is always warm", "the spice market"),
    "Copperton": ("a mining town full of smoke and noise", "the clock factory"),
    "Willowbrook": ("a small village beside a clear stream", "the stone well"),
}

# (country, capital, language, currency, continent)
COUNTRIES = [
    ("Valdoria", "Mirenza", "Valdorian", "crown", "Norvia"),
    ("Kestland", "Orrin", "Kestish", "mark", "Norvia"),
    ("Ombria", "Tessaly", "Ombrian", "lira", "Sudara"),
    ("Pellucia", "Arvant", "Pellucian", "florin", "Sudara"),
    ("Drevnia", "Kolmar", "Drevnian", "ruble", "Norvia"),
    ("Zantor", "Quiresh", "Zantoric", "dinar", "Estara"),
    ("Lumeria", "Solace", "Lumerian", "sol", "Estara"),
    ("Farrowmark", "Eastwick", "Farrish", "pound", "Westmar"),
    ("Ilyria", "Calder", "Ilyrian", "drachma", "Sudara"),
    ("Moravel", "Vinsk", "Moravelian", "thaler", "Norvia"),
    ("Tamarind", "Port Ayla", "Tamari", "rupee", "Estara"),
    ("Gorsica", "Belmonte", "Gorsican", "peso", "Westmar"),
    ("Nivalis", "Whitepeak", "Nivalian", "krona", "Norvia"),
    ("Sorrento Bay", "Marisol", "Sorrentine", "escudo", "Westmar"),
    ("Qadira", "Amun", "Qadiri", "riyal", "Estara"),
    ("Belgrove", "Highgate", "Belgrovian", "shilling", "Westmar"),
    ("Orlanth", "Duskmoor", "Orlanthi", "talent", "Sudara"),
    ("Yssilva", "Eldermere", "Yssilvan", "leaf", "Estara"),
]

# (animal, plural, legs, food, home, sound verb, kind)
ANIMALS = [
    ("cat", "cats", 4, "fish", "houses", "meows", "mammal"),
    ("dog", "dogs", 4, "meat", "houses", "barks", "mammal"),
    ("horse", "horses", 4, "hay", "fields", "neighs", "mammal"),
    ("cow", "cows", 4, "grass", "fields", "moos", "mammal"),
    ("goat", "goats", 4, "leaves", "hills", "bleats", "mammal"),
    ("rabbit", "rabbits", 4, "carrots", "burrows", "squeaks", "mammal"),
    ("mouse", "mice", 4, "seeds", "holes", "squeaks", "mammal"),
    ("owl", "owls", 2, "mice", "forests", "hoots", "bird"),
    ("parrot", "parrots", 2, "fruit", "jungles", "squawks", "bird"),
    ("duck", "ducks", 2, "bread", "ponds", "quacks", "bird"),
    ("canary", "canaries", 2, "seeds", "cages", "sings", "bird"),
    ("penguin", "penguins", 2, "fish", "icy coasts", "squawks", "bird"),
    ("frog", "frogs", 4, "flies", "ponds", "croaks", "amphibian"),
    ("tortoise", "tortoises", 4, "lettuce", "gardens", "hisses", "reptile"),
    ("snake", "snakes", 0, "mice", "deserts", "hisses", "reptile"),
    ("fish", "fish", 0, "plankton", "rivers", "blows bubbles", "fish"),
    ("spider", "spiders", 8, "flies", "corners", "spins webs", "arachnid"),
    ("bee", "bees", 6, "nectar", "hives", "buzzes", "insect"),
    ("ant", "ants", 6, "crumbs", "nests", "marches", "insect"),
    ("crab", "crabs", 10, "algae", "beaches", "clicks", "crustacean"),
    ("bear", "bears", 4, "berries", "forests", "growls", "mammal"),
    ("wolf", "wolves", 4, "deer", "forests", "howls", "mammal"),
    ("lion", "lions", 4, "zebras", "grasslands", "roars", "mammal"),
    ("elephant", "elephants", 4, "grass", "grasslands", "trumpets", "mammal"),
]

# (fruit or vegetable, plural, colour)
FOODS = [
    ("apple", "apples", "red"), ("banana", "bananas", "yellow"), ("pear", "pears", "green"),
    ("orange", "oranges", "orange"), ("plum", "plums", "purple"), ("cherry", "cherries", "red"),
    ("lemon", "lemons", "yellow"), ("carrot", "carrots", "orange"), ("grape", "grapes", "purple"),
    ("tomato", "tomatoes", "red"), ("cucumber", "cucumbers", "green"), ("mango", "mangoes", "orange"),
    ("potato", "potatoes", "brown"), ("onion", "onions", "white"), ("fig", "figs", "purple"),
]

# English word -> (French, Spanish, German, Japanese)
WORDS = {
    "hello": ("bonjour", "hola", "hallo", "こんにちは"),
    "thank you": ("merci", "gracias", "danke", "ありがとう"),
    "water": ("eau", "agua", "Wasser", "水"),
    "bread": ("pain", "pan", "Brot", "パン"),
    "cat": ("chat", "gato", "Katze", "猫"),
    "dog": ("chien", "perro", "Hund", "犬"),
    "house": ("maison", "casa", "Haus", "家"),
    "sun": ("soleil", "sol", "Sonne", "太陽"),
    "book": ("livre", "libro", "Buch", "本"),
    "friend": ("ami", "amigo", "Freund", "友達"),
    "good night": ("bonne nuit", "buenas noches", "gute Nacht", "おやすみ"),
    "coffee": ("café", "café", "Kaffee", "コーヒー"),
}
LANGUAGES = ("French", "Spanish", "German", "Japanese")

WEATHER = [
    ("sunny", "☀️"), ("rainy", "🌧️"), ("cloudy", "☁️"), ("windy", "🌬️"), ("snowy", "❄️"), ("foggy", "🌫️"),
]
# the diary's temperature range (°C) where the town's description promises one; other towns -10..35
CLIMATE = {"Sunport": (15, 35), "Frostholm": (-15, 10)}  # "always warm", "a cold town"
MOODS = ["happy", "tired", "excited", "calm", "curious", "hungry", "cheerful", "sleepy"]
EMOJI = ["🙂", "😄", "👍", "🎉", "🍎", "📚", "🐾", "⭐"]
OBJECTS = [
    "a shiny key", "an old map", "a blue umbrella", "a tiny wooden box", "a lost glove", "a golden coin",
    "a broken clock", "a letter with no name", "a red kite", "a silver spoon", "a feather", "a small bell",
]
PLACES = ["market", "library", "park", "bakery", "harbour", "school", "post office", "garden"]
ENDINGS = [
    "slept very well that night", "wrote about the day in a notebook", "shared a meal with friends",
    "smiled all evening", "told everyone the story the next morning", "put the kettle on and rested",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]

# ---------------------------------------------------------------------------------------------
# Document generators: each takes its own Random and returns one document


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _a(noun: str) -> str:
    """'a cat', 'an owl': the noun with its indefinite article (every table word is sounded as spelled)."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _n(n: int, singular: str, plural: str) -> str:
    """'1 apple', '3 apples', '0 apples': the count with its noun in the right number."""
    return f"{n} {singular if n == 1 else plural}"


def _left(n: int, singular: str, plural: str) -> str:
    """'There is 1 plum left.', 'There are 0 plums left.'"""
    return f"There {'is' if n == 1 else 'are'} {_n(n, singular, plural)} left."


def _climate(town: str) -> tuple[int, int]:
    return CLIMATE.get(town, (-10, 35))


def _weather(rng: random.Random, town: str) -> tuple[str, str]:
    """(weather, icon) of a day in town: never snowy in Sunport, where it is always warm."""
    return rng.choice([w for w in WEATHER if w[0] != "snowy" or _climate(town)[0] <= 0])


def _story(rng: random.Random) -> str:
    name, he, his, job, town, pet, pet_name, food = rng.choice(PEOPLE)
    friend = rng.choice([p for p in PEOPLE if p[0] != name])
    desc, landmark = TOWNS[town]
    weather, icon = _weather(rng, town)
    weekday = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
    place = rng.choice(PLACES)
    thing = rng.choice(OBJECTS)
    n = rng.randint(2, 9)
    fruit = rng.choice(FOODS)
    lines = [
        rng.choice([f"Once upon a time, in {town}, there lived a {job} named {name}.",
                    f"{name} was a {job} who lived in {town}.",
                    f"In {town} there was a {job} called {name}."]),
        f"{town} is {desc}, famous for {landmark}.",
        f"{name} had {_a(pet)} called {pet_name}, and {he} loved to eat {food}.",
        f"One {weekday} morning the weather was {weather}, so {name} walked to the {place}.",
    ]
    if rng.random() < 0.5:
        lines.append(f"At the {place}, {he} bought {n} {fruit[1]}. They were {fruit[2]} and fresh.")
    lines.append(f"On the way, {name} met {friend[0]}, the {friend[3]} from {friend[4]}.")
    lines.append(rng.choice([f'"Hello, {friend[0]}!" said {name}. "How are you today?"',
                             f'"Good morning, {name}!" said {friend[0]}. "What a {weather} day {icon}"',
                             f"{name} and {friend[0]} talked for a long time about {friend[4]}."]))
    if rng.random() < 0.7:
        lines.append(f"Near {landmark}, {name} found {thing}.")
        lines.append(rng.choice([f"{_cap(he)} gave it to {friend[0]}, who was very surprised.",
                                 f"{_cap(he)} took it home to show {pet_name}.",
                                 f"Nobody knew where it came from, so {name} kept it safe."]))
    lines.append(f"When {name} came home, {pet_name} the {pet} was waiting at the door.")
    lines.append(f"In the end, {name} {rng.choice(ENDINGS)}.")
    if rng.random() < 0.5:
        lines.append("The end.")
    return " ".join(lines)


def _facts(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 14)):
        kind = rng.randrange(5)
        if kind == 0:
            c, cap, lang, cur, cont = rng.choice(COUNTRIES)
            lines.append(rng.choice([f"The capital of {c} is {cap}.",
                                     f"{cap} is the capital city of {c}, a country in {cont}.",
                                     f"People in {c} speak {lang} and pay with the {cur}.",
                                     f"Q: What is the capital of {c}?\nA: The capital of {c} is {cap}."]))
        elif kind == 1:
            a, plural, legs, eat, home, sound, cls = rng.choice(ANIMALS)
            legs_text = "no legs" if legs == 0 else f"{legs} legs"
            lines.append(rng.choice([f"{_cap(_a(a))} has {legs_text}.", f"{_cap(plural)} eat {eat}.",
                                     f"{_cap(plural)} live in {home}.", f"The {a} is {_a(cls)}.",
                                     f"{_cap(_a(a))} {sound}.",
                                     f"Q: How many legs does {_a(a)} have?\nA: {_cap(_a(a))} has {legs_text}."]))
        elif kind == 2:
            f, plural, colour = rng.choice(FOODS)
            lines.append(rng.choice([f"A ripe {f} is {colour}.", f"{_cap(plural)} are usually {colour}."]))
        elif kind == 3:
            name, he, his, job, town, pet, pet_name, food = rng.choice(PEOPLE)
            lines.append(rng.choice([f"{name} is a {job} who lives in {town}.",
                                     f"{name}'s {pet} is called {pet_name}.",
                                     f"{name}'s favourite food is {food}.",
                                     f"Q: Where does {name} live?\nA: {name} lives in {town}."]))
        else:
            town, (desc, landmark) = rng.choice(list(TOWNS.items()))
            lines.append(rng.choice([f"{town} is {desc}.", f"{_cap(landmark)} is in {town}."]))
    return "\n".join(lines)


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 12)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(f"{a} + {b} = {a + b}")
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} - {b} = {a - b}")
        elif kind == 2:
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            lines.append(f"{a} {rng.choice(['×', '*', 'x'])} {b} = {a * b}")
        elif kind == 3:
            b = rng.randint(1, 12)
            q = rng.randint(0, 12)
            lines.append(f"{b * q} / {b} = {q}")
        elif kind == 4:
            name, he = rng.choice(PEOPLE)[:2]
            fruit = rng.choice(FOODS)
            x, y = rng.randint(1, 20), rng.randint(1, 20)
            if rng.random() < 0.5:
                lines.append(f"{name} has {_n(x, *fruit[:2])} and buys {y} more. How many {fruit[1]} does "
                             f"{name} have now?\nAnswer: {x} + {y} = {x + y}. {name} has {x + y} {fruit[1]}.")
            else:
                x, y = max(x, y), min(x, y)
                lines.append(f"{name} has {_n(x, *fruit[:2])} and eats {y}. How many are left?\n"
                             f"Answer: {x} - {y} = {x - y}. {_left(x - y, *fruit[:2])}")
        else:
            n = rng.randint(0, 12)
            parity = "even" if n % 2 == 0 else "odd"
            lines.append(rng.choice([f"{_cap(NUMBER_WORDS[n])} is written as {n}.",
                                     f"{n} is an {parity} number.",
                                     f"The number after {a} is {a + 1}."]))
    return "\n".join(lines)


def _list(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        name = rng.choice(PEOPLE)[0]
        items = rng.sample(FOODS, rng.randint(3, 7))
        lines = [f"Shopping list for {name}:"]
        counts = [rng.randint(1, 9) for _ in items]
        lines += [f"- {n} {f[0] if n == 1 else f[1]}" for n, f in zip(counts, items)]
        total = sum(counts)
        lines.append(f"That is {total} things in total.")
    elif kind == 1:
        home = rng.choice(sorted({a[4] for a in ANIMALS}))
        found = [a for a in ANIMALS if a[4] == home]
        rng.shuffle(found)
        lines = [f"{rng.choice(PEOPLE)[0]} wrote down the animals that live in {home}:"]
        lines += [f"{i + 1}. the {a[0]}" for i, a in enumerate(found)]
    else:
        name, he, his, job, town = rng.choice(PEOPLE)[:5]
        steps = rng.sample(["wake up early", "feed the animals", "drink a cup of tea", "read the news",
                            "walk to work", "eat lunch in the sun", "visit a friend", "cook dinner",
                            "water the plants", "write a letter"], rng.randint(4, 7))
        lines = [f"What {name} the {job} does every day:"]
        lines += [f"{i + 1}. {_cap(s)}" for i, s in enumerate(steps)]
    return "\n".join(lines)


def _dialogue(rng: random.Random) -> str:
    a, b = rng.sample(PEOPLE, 2)
    weather, icon = _weather(rng, b[4])
    lines = [f"{a[0]}: Hello, {b[0]}! {rng.choice(EMOJI)}",
             f"{b[0]}: Hi, {a[0]}. I am {rng.choice(MOODS)} today. It is {weather} here {icon}"]
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        if kind == 0:
            c = rng.choice(COUNTRIES)
            lines += [f"{a[0]}: Do you know the capital of {c[0]}?", f"{b[0]}: Yes, it is {c[1]}."]
        elif kind == 1:
            an = rng.choice(ANIMALS)
            lines += [f"{a[0]}: What do {an[1]} eat?", f"{b[0]}: {_cap(an[1])} eat {an[3]}."]
        elif kind == 2:
            word, tr = rng.choice(list(WORDS.items()))
            i = rng.randrange(len(LANGUAGES))
            lines += [f"{a[0]}: How do you say \"{word}\" in {LANGUAGES[i]}?",
                      f"{b[0]}: In {LANGUAGES[i]}, \"{word}\" is \"{tr[i]}\"."]
        else:
            x, y = rng.randint(1, 50), rng.randint(1, 50)
            lines += [f"{a[0]}: What is {x} plus {y}?", f"{b[0]}: {x} plus {y} is {x + y}."]
    lines.append(f"{a[0]}: Thank you, {b[0]}. See you in {b[4]}!")
    return "\n".join(lines)


def _diary(rng: random.Random) -> str:
    name, he, his, job, town, pet, pet_name, food = rng.choice(PEOPLE)
    day = datetime.date(1990, 1, 1) + datetime.timedelta(days=rng.randrange(40 * 365))
    weather, icon = _weather(rng, town)
    temp = rng.randint(-15, 0) if weather == "snowy" else rng.randint(*_climate(town))
    hour, minute = rng.randint(6, 9), rng.choice([0, 15, 30, 45])
    price = rng.randint(1, 20) + rng.choice([0, 0.25, 0.5, 0.75])
    lines = [
        f"Dear diary, today is {day.strftime('%A')}, {day.day} {day.strftime('%B')} {day.year}.",
        f"I woke up at {hour}:{minute:02d}. The weather in {town} was {weather} {icon} and it was {temp} °C.",
        f"I fed {pet_name} and went to work as a {job}.",
        f"At lunch I paid {price:.2f} coins for some {food}.",
    ]
    if rng.random() < 0.5:
        word, tr = rng.choice(list(WORDS.items()))
        i = rng.randrange(len(LANGUAGES))
        lines.append(f"Today I learned that \"{word}\" in {LANGUAGES[i]} is \"{tr[i]}\".")
    lines.append(f"Tomorrow is {(day + datetime.timedelta(days=1)).strftime('%A')}. — {name}")
    return "\n".join(lines)


GENERATORS = (_story, _story, _facts, _arithmetic, _list, _dialogue, _diary)

# ---------------------------------------------------------------------------------------------
# Public API


def _check_split(split: str) -> None:
    if split not in NUM_DOCUMENTS:
        raise ValueError(f"unknown corpus split {split!r}; splits are: {', '.join(NUM_DOCUMENTS)}")


def num_documents(split: str = "train") -> int:
    _check_split(split)
    return NUM_DOCUMENTS[split]


def document(split: str, i: int, seed: int = 0) -> str:
    """Document i of a split; a pure function of (seed, split, i)."""
    _check_split(split)
    if not 0 <= i < NUM_DOCUMENTS[split]:
        raise IndexError(f"corpus document {i} out of range for split {split!r} ({NUM_DOCUMENTS[split]} documents)")
    rng = random.Random(f"{seed}/{split}/{i}")
    parts = [rng.choice(GENERATORS)(rng) for _ in range(rng.randint(2, 4))]
    return "\n\n".join(parts)


def documents(split: str = "train", seed: int = 0) -> Iterator[str]:
    """All documents of a split, in index order."""
    for i in range(num_documents(split)):
        yield document(split, i, seed)

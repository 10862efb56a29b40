"""Chat tasks generated from the embedded corpus's world, so the whole pipeline can end with a chat model offline.

Every answer comes from the same fixed tables (`nanochat_jax.corpus`) that the pretraining documents are
written from, so a model that learned the corpus can learn to answer in chat form:
- WorldFacts: "What is the capital of Gorsica?" -> "The capital of Gorsica is Belmonte." (countries, people,
  towns, animals, foods); scored by whether the key answer appears in the completion.
- WordProblems: arithmetic stories whose answer calls the calculator (a python part and its python_output
  part, like GSM8K) and ends with "#### n"; scored on that number.
- SmallTalk: multi-turn greetings, moods, weather and translations (no score).
- Identity: who the assistant is (no score).
Example i of a task's split comes from random.Random(f"corpuschat/<task>/<split>/<i>"), so train and test are
different samples of the same world (the facts themselves are shared: they are what was pretrained on).
"""

from __future__ import annotations

import random
import re

from nanochat_jax import corpus
from nanochat_jax.tasks.base import GeneratedTask
from nanochat_jax.tasks.gsm8k import evaluate_final_number

ASSISTANT_NAME = "nanochat-jax"


def _rng(task: str, split: str, index: int) -> random.Random:
    return random.Random(f"corpuschat/{task}/{split}/{index}")


def _chat(*turns: str | list, **extra) -> dict:
    """A conversation from alternating user / assistant contents."""
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], **extra}


class _Generated(GeneratedTask):
    """A generated task; subclasses implement make(rng) -> conversation."""

    name = ""

    def get_example(self, index: int) -> dict:
        return self.make(_rng(self.name, self.split, index))

    def make(self, rng: random.Random) -> dict:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Facts


def _country_fact(rng):
    country, capital, language, currency, continent = rng.choice(corpus.COUNTRIES)
    return country, rng.choice([
        (f"What is the capital of {country}?", f"The capital of {country} is {capital}.", capital),
        (f"Which city is the capital of {country}?", f"{capital} is the capital city of {country}.", capital),
        (f"What language do people speak in {country}?", f"People in {country} speak {language}.", language),
        (f"What currency do they use in {country}?", f"People in {country} pay with the {currency}.", currency),
        (f"On which continent is {country}?", f"{country} is a country in {continent}.", continent),
        (f"{capital} is the capital of which country?", f"{capital} is the capital of {country}.", country),
    ])


def _person_fact(rng):
    name, he, his, job, town, pet, pet_name, food = rng.choice(corpus.PEOPLE)
    return name, rng.choice([
        (f"Where does {name} live?", f"{name} lives in {town}.", town),
        (f"What does {name} do for a living?", f"{name} is a {job} who lives in {town}.", job),
        (f"What is the name of {name}'s {pet}?", f"{name}'s {pet} is called {pet_name}.", pet_name),
        (f"What kind of pet does {name} have?", f"{name} has {corpus._a(pet)} called {pet_name}.", pet),
        (f"What is {name}'s favourite food?", f"{name}'s favourite food is {food}.", food),
    ])


def _town_fact(rng):
    town, (description, landmark) = rng.choice(list(corpus.TOWNS.items()))
    return town, rng.choice([
        (f"What is {town} like?", f"{town} is {description}.", description),
        (f"What is {town} famous for?", f"{town} is famous for {landmark}.", landmark),
    ])


def _animal_fact(rng):
    animal, plural, legs, food, home, sound, kind = rng.choice(corpus.ANIMALS)
    legs_text = "no legs" if legs == 0 else f"{legs} legs"
    an = corpus._a(animal)
    return animal, rng.choice([
        (f"How many legs does {an} have?", f"{corpus._cap(an)} has {legs_text}.", legs_text),
        (f"What do {plural} eat?", f"{corpus._cap(plural)} eat {food}.", food),
        (f"Where do {plural} live?", f"{corpus._cap(plural)} live in {home}.", home),
        (f"What kind of animal is the {animal}?", f"The {animal} is {corpus._a(kind)}.", kind),
        (f"What sound does {an} make?", f"{corpus._cap(an)} {sound}.", sound),
    ])


def _food_fact(rng):
    food, plural, colour = rng.choice(corpus.FOODS)
    return food, rng.choice([
        (f"What colour is a ripe {food}?", f"A ripe {food} is {colour}.", colour),
        (f"What colour are {plural} usually?", f"{corpus._cap(plural)} are usually {colour}.", colour),
    ])


FACT_KINDS = (_country_fact, _country_fact, _person_fact, _person_fact, _town_fact, _animal_fact, _food_fact)


class WorldFacts(_Generated):
    """One question about the corpus world and its one-sentence answer. The conversation also holds
    "subject" (the country, person, town, animals or food asked about) and "answer_key" (the fact asked for)."""

    name = "facts"

    def make(self, rng: random.Random) -> dict:
        subject, (question, answer, key) = rng.choice(FACT_KINDS)(rng)
        if rng.random() < 0.2:
            question = rng.choice(["Quick question: ", "Hi! ", "Can you tell me something? "]) + question
        return _chat(question, answer, answer_key=key, subject=subject)

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the key fact (e.g. the capital's name) appears in the completion as whole words, else 0. Where
        the reference says it twice ("A ripe orange is orange.", "The fish is a fish.") it must appear twice."""
        key = re.compile(rf"(?<!\w){re.escape(conversation['answer_key'])}(?!\w)")
        needed = max(1, len(key.findall(conversation["messages"][-1]["content"])))
        return int(len(key.findall(completion)) >= needed)


# ---------------------------------------------------------------------------------------------
# Arithmetic with the calculator


def _problem(rng: random.Random) -> tuple[str, str, str, str, int]:
    """(question, lead-in text, python expression, closing sentence template with {n}, answer)."""
    name = rng.choice(corpus.PEOPLE)[0]
    other = rng.choice([p[0] for p in corpus.PEOPLE if p[0] != name])
    food, plural, _ = rng.choice(corpus.FOODS)
    kind = rng.randrange(5)
    if kind == 0:
        x, y = rng.randint(1, 60), rng.randint(1, 60)
        return (f"{name} has {corpus._n(x, food, plural)} and buys {y} more. How many {plural} does {name} have now?",
                f"{name} starts with {corpus._n(x, food, plural)} and buys {y} more, so we add them: ", f"{x} + {y}",
                f"{name} has {{n}} {plural} now.", x + y)
    if kind == 1:
        x = rng.randint(5, 80)
        y = rng.randint(1, x)
        return (f"{name} has {x} {plural} and gives {y} to {other}. How many {plural} are left?",
                f"{name} gives away {y} of the {x} {plural}, so we subtract: ", f"{x} - {y}",
                f"There {'is {n} ' + food if x - y == 1 else 'are {n} ' + plural} left.", x - y)
    if kind == 2:
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        return (f"{name} has {x} baskets with {y} {plural} in each basket. How many {plural} is that in total?",
                f"There are {x} baskets of {y} {plural} each, so we multiply: ", f"{x} * {y}",
                f"That is {{n}} {plural} in total.", x * y)
    if kind == 3:
        people, each = rng.randint(2, 9), rng.randint(2, 12)
        return (f"{name} shares {people * each} {plural} equally among {people} friends. "
                f"How many {plural} does each friend get?",
                f"{people * each} {plural} shared by {people} friends means we divide: ", f"{people * each} // {people}",
                f"Each friend gets {{n}} {plural}.", each)
    price, count = rng.randint(1, 9), rng.randint(2, 8)
    paid = price * count + rng.randint(0, 20)
    coins = corpus._n(price, "coin", "coins")
    change = paid - count * price
    return (f"One {food} costs {coins}. {name} buys {count} and pays "
            f"with {paid} coins. How much change does {name} get?",
            f"{count} at {coins} cost {count} * {price} coins, and the change is what is left of {paid}: ",
            f"{paid} - {count} * {price}", f"{name} gets {{n}} {'coin' if change == 1 else 'coins'} of change.", change)


class WordProblems(_Generated):
    """Arithmetic stories answered with a calculator call: text, python, python_output, text ending '#### n'."""

    name = "arithmetic"

    def make(self, rng: random.Random) -> dict:
        question, lead, expression, closing, n = _problem(rng)
        parts = [{"type": "text", "text": lead},
                 {"type": "python", "text": expression},
                 {"type": "python_output", "text": str(n)},
                 {"type": "text", "text": f"\n{closing.format(n=n)}\n#### {n}"}]
        return _chat(question, parts)

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion's final '#### n' is the right number, else 0."""
        return evaluate_final_number(conversation, completion)


# ---------------------------------------------------------------------------------------------
# Small talk and identity


GREETINGS = ["Hello!", "Hi there!", "Good morning!", "Hey!", "Good evening!"]


def _translation(rng):
    word, translations = rng.choice(list(corpus.WORDS.items()))
    i = rng.randrange(len(corpus.LANGUAGES))
    language = corpus.LANGUAGES[i]
    return (f'How do you say "{word}" in {language}?',
            f'In {language}, "{word}" is "{translations[i]}".')


def _weather(rng):
    name, he, his, job, town = rng.choice(corpus.PEOPLE)[:5]
    weather, icon = corpus._weather(rng, town)
    return (f"It is {weather} here in {town} today.",
            rng.choice([f"A {weather} day in {town}! {icon} I hope you enjoy it.",
                        f"Thanks for telling me. {corpus._cap(weather)} days in {town} sound nice {icon}"]))


def _mood(rng):
    mood = rng.choice(corpus.MOODS)
    return (f"I feel {mood} today.",
            rng.choice([f"Thank you for sharing that you feel {mood}. Is there anything I can help you with?",
                        f"I am glad you told me you feel {mood}. What would you like to talk about?"]))


def _recommend(rng):
    town, (description, landmark) = rng.choice(list(corpus.TOWNS.items()))
    return (f"I am visiting {town}. What should I see?",
            f"{town} is {description}. You should visit {landmark}.")


SMALL_TALK_TURNS = (_translation, _translation, _weather, _mood, _recommend)


class SmallTalk(_Generated):
    """Two to four exchanges: a greeting, then questions about the world, and a goodbye."""

    name = "smalltalk"

    def make(self, rng: random.Random) -> dict:
        turns = [rng.choice(GREETINGS),
                 rng.choice(["Hello! How can I help you today?", "Hi! What would you like to talk about?",
                             "Hello! I am happy to chat. 🙂"])]
        for _ in range(rng.randint(1, 2)):
            turns += list(rng.choice(SMALL_TALK_TURNS)(rng))
        if rng.random() < 0.5:
            turns += [rng.choice(["Thank you!", "Thanks, bye!", "That was helpful, thanks."]),
                      rng.choice(["You are welcome! Goodbye.", "Happy to help. See you soon! 👋"])]
        return _chat(*turns)


IDENTITY_QA = [
    (["Who are you?", "What are you?", "Tell me about yourself."],
     f"I am {ASSISTANT_NAME}, a small language model trained from scratch with JAX on a tiny generated corpus. "
     "I can answer simple questions about my little world, do arithmetic with a calculator, and chat."),
    (["What is your name?", "Do you have a name?"], f"My name is {ASSISTANT_NAME}."),
    (["Who made you?", "Who trained you?", "Who built you?"],
     f"I was trained with {ASSISTANT_NAME}, a JAX port of Andrej Karpathy's nanochat: pretraining, mid-training "
     "and supervised fine-tuning, all in one small code base."),
    (["Are you ChatGPT?", "Are you a human?"],
     f"No, I am {ASSISTANT_NAME}, a very small language model. I know much less than big assistants."),
    (["What can you do?", "How can you help me?"],
     "I can answer questions about the towns, people, countries and animals I learned about, solve small "
     "arithmetic problems with my calculator, spell words and chat a little."),
    (["How big are you?", "How many parameters do you have?"],
     "I am tiny: a few million parameters, small enough to train on a laptop CPU in minutes."),
]


class Identity(_Generated):
    """Who the assistant is, sometimes after a greeting, sometimes with a second question."""

    name = "identity"

    def __init__(self, size: int = 200, split: str = "train", **kwargs):
        super().__init__(size, split, **kwargs)

    def make(self, rng: random.Random) -> dict:
        questions, answer = rng.choice(IDENTITY_QA)
        question = rng.choice(questions)
        if rng.random() < 0.3:
            question = f"{rng.choice(GREETINGS)} {question}"
        turns = [question, answer]
        if rng.random() < 0.3:
            more_questions, more_answer = rng.choice([qa for qa in IDENTITY_QA if qa[1] != answer])
            turns += [rng.choice(more_questions), more_answer]
        return _chat(*turns)


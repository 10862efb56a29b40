"""Synthetic spelling tasks, generated deterministically from a small built-in word list.

SpellingBee ("How many r are in strawberry?"): the assistant spells the word out with positions, counts
the letter by hand, double-checks with a python tool call 'strawberry'.count('r') and ends with
"#### 3"; scored on that final number like GSM8K. SimpleSpelling ("Spell the word: apple" ->
"apple:a,p,p,l,e") drills the hard part: mapping tokens to their letters. Example i of the train split
comes from random.Random(i), of the test split from random.Random(TEST_SEED_OFFSET + i).
"""

from __future__ import annotations

import random

from nanochat_jax.tasks.base import GeneratedTask
from nanochat_jax.tasks.gsm8k import evaluate_final_number

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TEST_SEED_OFFSET = 10_000_000  # larger than any split size, so train and test seeds never meet

WORDS = tuple("""
about above accept accident account across action active actor address admire adult advice afraid
after afternoon again against agree ahead airplane airport alarm album alive allow almost alone along
already always amazing amount anchor ancient angle animal answer anything apartment apple april arrow
article artist assistant attention autumn avocado awesome baby balance balloon banana barrel basket
battery beach beautiful bedroom believe belly between bicycle birthday blanket blossom bottle bridge
brilliant broccoli brother bubble buffalo butter butterfly cabbage calendar camera candle capital
caramel carpet carrot castle cattle ceiling cellar century cherry chicken chimney chocolate circle
classroom coconut coffee collect college committee common computer connect cookie copper correct
cottage cotton country courage cousin cricket crystal cucumber curious current dessert diamond
different dinner direction dollar dragon drawer dream during eagle early earth eleven elephant
embarrass engine enough envelope evening every example exercise expensive family famous farmer
feather february festival fiddle finger follow forest forward freedom friend frozen funny garden
giraffe glass globe goodness gorilla grammar grass guitar hammer happiness harbor harvest hello
helicopter hippopotamus holiday honey horizon hospital hungry illness imagine immediately important
island jacket january jelly jigsaw journey juggle jungle kangaroo kettle kitchen kitten knowledge
ladder language lantern lemon letter library lightning little lizard llama lobster lollipop machine
magazine mammal mango marble market meadow message middle million mirror mississippi mitten monkey
morning mountain museum mushroom music necessary needle neighbor network nothing november number
occasion ocean office often orange orchestra oxygen paddle pallet paper parallel parrot pebble pencil
people pepper piano pillow pineapple planet pocket possess potato pretty puppy puzzle pyramid quarrel
queen question quickly quiet rabbit raccoon rainbow recommend remember rhythm river rocket rubber
saddle sapphire satellite scissors season seventeen shadow shelter silly sister skeleton sleeve
slipper snowflake soccer spaghetti sparrow spelling squirrel staff stapler strawberry street success
summer sunflower supper surprise swallow syllable symbol table teacher teddy telephone tennis thirteen
thousand thunder tomato tomorrow tooth tortoise traffic travel triangle trumpet tunnel turtle twelve
umbrella uncle under unusual valley vanilla vegetable velvet village violin volcano waffle wallet
walrus water weather wednesday whistle window winner winter wizard wobble wonderful woodpecker yellow
yesterday yoyo zebra zipper zoo
""".split())

# The question, phrased a few ways as augmentation; {letter} and {word} may get quoted.
TEMPLATES = (
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the {letter} in {word}",
    "Count how often {letter} shows up in the word {word}",
    "What is the number of {letter} in {word}",
    "In {word}, how many {letter} can you find",
    "How many {letter}'s does {word} have",
    "Tell me how many {letter} there are in {word}",
    "{word}: how many {letter}",
    "¿Cuántas {letter} tiene la palabra {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie viele {letter} hat das Wort {word}",
    "{word}里有几个{letter}",
)


def _check_words(words) -> tuple[str, ...]:
    words = tuple(words)
    if not words:
        raise ValueError("the word list is empty")
    bad = [w for w in words if not w or not set(w) <= set(ALPHABET)]
    if bad:
        raise ValueError(f"words must be non-empty and lowercase a-z only, got {bad[:5]}")
    return words


def _rng(split: str, index: int) -> random.Random:
    return random.Random(index if split == "train" else TEST_SEED_OFFSET + index)


def spell(word: str) -> str:
    """'apple' -> 'apple:a,p,p,l,e' (no spaces: ' a' and 'a' are different tokens)."""
    return f"{word}:{','.join(word)}"


class SpellingBee(GeneratedTask):
    def __init__(self, size: int = 1000, split: str = "train", words=WORDS, **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = _check_words(words)

    def get_example(self, index: int) -> dict:
        rng = _rng(self.split, index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)  # sometimes a letter not in it
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{letter_quote}{letter}{letter_quote}",
                                   word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            question += "?"
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": counting_parts(word, letter)}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion's final '#### n' is the right count, else 0."""
        return evaluate_final_number(conversation, completion)


def counting_parts(word: str, letter: str) -> list[dict]:
    """The assistant's worked answer: spell, count position by position, check with python, answer '#### n'."""
    count = word.count(letter)
    lines = [f"We need the number of '{letter}' in the word '{word}'. Counting by hand first.", "",
             "Spelled out:", spell(word), "", f"Going through the letters looking for '{letter}':"]
    seen = 0
    for i, char in enumerate(word, 1):
        if char == letter:
            seen += 1
            lines.append(f"{i}:{char} hit! count={seen}")
        else:
            lines.append(f"{i}:{char}")
    lines += ["", f"By hand that makes {seen}."]
    return [
        {"type": "text", "text": "\n".join(lines)},
        {"type": "text", "text": "\n\nChecking with Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython also says {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]


class SimpleSpelling(GeneratedTask):
    def __init__(self, size: int = 1000, split: str = "train", words=WORDS, **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = list(_check_words(words))
        random.Random(42).shuffle(self.words)  # a different word order from SpellingBee's

    def get_example(self, index: int) -> dict:
        word = _rng(self.split, index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": spell(word)}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion is exactly the reference spelling (surrounding whitespace ignored), else 0."""
        return int(completion.strip() == conversation["messages"][-1]["content"])

"""Word lists, the noise sentence, and a seeded prose generator: everything the tasks' text is made of.

Nothing here is downloaded. RULER (Hsieh et al. 2024) draws its keys and word lists from the ``wonderwords``
package and its prose from Paul Graham's essays; offline we use the short lists below and a sentence
grammar over them, which gives varied, plausible English-like sentences with no digits, hyphens or
uppercase runs, so that no haystack can contain (or be mistaken for) a needle.
"""

from __future__ import annotations

import random
import re
import string

# The Landmark Attention / RULER "noise" haystack sentence.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

ADJECTIVES = """
amber ancient bitter bold brave breezy bright brisk busy calm cheerful chilly clever cloudy cozy crisp
crooked curious damp dark deep distant dreamy dry dusty eager early elegant empty faint famous fancy fierce
fragile fresh frozen fuzzy gentle giant glossy golden graceful grumpy hasty heavy hidden hollow honest humble
hungry icy jagged jolly kind large lazy lean little lively lonely loud loyal lucky mellow merry mighty misty
modern muddy narrow nimble noisy odd orange pale patient plain playful plump polite proud purple quaint quick
quiet rapid rare restless rough round royal rusty sandy scarlet secret sharp shiny shy silent silver simple
sleepy slim slow smooth snowy soft solid sour spicy spotted steady sticky stormy strange striped sturdy sunny
sweet swift tall tame tender thick thin tidy tiny tired velvet vivid warm wet wild windy wise witty wooden
woolly young zealous
""".split()

NOUNS = """
anchor apple arrow badge banana barrel basket battery beacon bell biscuit blanket boat bottle bucket button
cabinet cactus camera candle canvas carpet carrot chair cherry clock cloud coat coin comet compass cookie
cottage crayon crown cup curtain desk diamond dolphin door dragon drum eagle engine envelope falcon feather
fence flag flute fountain fox garlic glove guitar hammer hammock harp hat helmet honey horse iceberg jacket jar
jewel kettle kitten kite ladder ladle lamp lantern lemon letter lion magnet map marble mirror mitten mountain
napkin notebook ocean orchid otter owl paddle painting panda parrot pebble pencil pepper piano pigeon pillow
planet plate pocket pumpkin puzzle quilt rabbit radio raven ribbon ring robot rocket rope saddle sail salmon
sandal scarf shell shield ship shoe sparrow spoon squirrel star statue stone suitcase sword table tablet
teapot telescope tent thimble ticket tiger token towel tractor train tree trumpet tulip turtle umbrella vase
violin wagon wallet walnut whistle willow window wizard yacht zebra
""".split()

PLACES = """
attic bakery beach bridge cabin castle cellar chapel courtyard factory farm field forest garden harbor hill
hospital island kitchen lake library lighthouse market meadow mill museum orchard palace port river school
square stable station street theater tower valley village workshop
""".split()

NAMES = """
Alma Anna Ben Boris Cecile Clara David Dora Elena Emil Felix Grace Hugo Ines Iris Jonas Kira Lena Leo Marco
Maya Mira Nora Oscar Paula Pavel Quinn Rosa Ruth Sam Simon Tara Theo Tobias Umar Vera Walter Xenia Yusuf Zoe
""".split()

# (base, past) pairs: the grammar needs the base form after "will", "did" and "to", the past otherwise.
TRANSITIVE = [tuple(pair.split(":")) for pair in """
admire:admired borrow:borrowed bring:brought build:built buy:bought carry:carried catch:caught chase:chased
choose:chose clean:cleaned collect:collected count:counted cover:covered deliver:delivered describe:described
draw:drew drop:dropped examine:examined fill:filled find:found fold:folded follow:followed forget:forgot
greet:greeted guard:guarded hide:hid hold:held keep:kept lift:lifted measure:measured mend:mended move:moved
notice:noticed open:opened pack:packed paint:painted plant:planted polish:polished protect:protected
pull:pulled push:pushed question:questioned remember:remembered repair:repaired sell:sold share:shared
sketch:sketched study:studied test:tested throw:threw trade:traded visit:visited wash:washed watch:watched
wrap:wrapped
""".split()]

INTRANSITIVE = [tuple(pair.split(":")) for pair in """
appear:appeared arrive:arrived blink:blinked climb:climbed collapse:collapsed dance:danced drift:drifted
fade:faded fall:fell glow:glowed grow:grew hesitate:hesitated hurry:hurried laugh:laughed linger:lingered
listen:listened pause:paused rest:rested return:returned rise:rose sing:sang shiver:shivered shout:shouted
sigh:sighed sleep:slept slip:slipped smile:smiled stay:stayed stumble:stumbled swim:swam travel:traveled
tremble:trembled vanish:vanished wait:waited wander:wandered wave:waved whisper:whispered work:worked
""".split()]

ADVERBS = """
boldly briefly calmly carefully eagerly easily gently happily kindly loudly nervously patiently proudly
quickly quietly silently slowly softly steadily warmly
""".split()

PREPOSITIONS = "above across along around behind beside beyond inside near past through toward under".split()

TIMES = [
    "that morning", "at dawn", "in the evening", "before noon", "after the storm", "last winter",
    "every spring", "on a quiet afternoon", "late at night", "the next day", "during the festival", "long ago",
    "all summer", "by sunset", "early on", "in the autumn",
]

CONNECTORS = [
    "however", "meanwhile", "later", "still", "afterward", "in the end", "at first", "of course",
    "once again", "for a while", "suddenly", "luckily", "sadly",
]

QUANTITIES = ["two", "three", "several", "many", "a few", "some", "countless", "a dozen"]

# Sentence templates. Each {slot} is drawn independently; "a" becomes "an" before a vowel afterwards.
TEMPLATES = [
    "the {adj} {noun} {vt} the {noun} near the {place}.",
    "{name} {vi} {adv} {time}.",
    "{conn}, the {noun} {vt} a {adj} {noun}.",
    "the {noun} {vi} {prep} the {place} while {name} {vt} the {noun}.",
    "{time}, {name} and {name} {vt} some {adj} {nouns} {prep} the {place}.",
    "it was {adj} in the {place} when the {noun} {vi}.",
    "nobody knew why the {adj} {noun} {vi} so {adv}.",
    "{name} said that the {noun} {vt} every {noun} in the {place}.",
    "a {adj} {noun} {vi} {prep} the {adj} {place}.",
    "the {nouns} of the {place} were {adj} and {adj}.",
    "{conn}, {name} {vt} the {noun} because it was {adj}.",
    "if the {noun} {vi_s} again, {name} will {vt_base} the {adj} {noun}.",
    "there were {qty} {adj} {nouns} {prep} the {place}.",
    "{name} often {vt_s} {nouns} {prep} the {place} {time}.",
    "the {noun} and the {noun} {vi} together {time}.",
    "why did the {noun} {vt_base} the {adj} {noun}?",
    "{name} {vt} a {noun}, and then the {noun} {vi} {adv}.",
    "every {noun} in the {place} seemed {adj} {time}.",
    "the {place} was {adj}, so {name} {vi} {prep} the {noun}.",
    "{name} asked {name} to {vt_base} the {nouns} before the {noun} {vi}.",
]

def plural(noun: str) -> str:
    """Regular English plural (the noun list avoids irregular ones)."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def third_person(verb: str) -> str:
    """Present tense, third person singular: "carry" -> "carries", "watch" -> "watches"."""
    return plural(verb)


_SLOTS = {
    "adj": lambda r: r.choice(ADJECTIVES),
    "noun": lambda r: r.choice(NOUNS),
    "nouns": lambda r: plural(r.choice(NOUNS)),
    "place": lambda r: r.choice(PLACES),
    "name": lambda r: r.choice(NAMES),
    "vt": lambda r: r.choice(TRANSITIVE)[1],
    "vt_base": lambda r: r.choice(TRANSITIVE)[0],
    "vt_s": lambda r: third_person(r.choice(TRANSITIVE)[0]),
    "vi": lambda r: r.choice(INTRANSITIVE)[1],
    "vi_s": lambda r: third_person(r.choice(INTRANSITIVE)[0]),
    "adv": lambda r: r.choice(ADVERBS),
    "prep": lambda r: r.choice(PREPOSITIONS),
    "time": lambda r: r.choice(TIMES),
    "conn": lambda r: r.choice(CONNECTORS),
    "qty": lambda r: r.choice(QUANTITIES),
}
_SLOT = re.compile(r"\{(\w+)\}")
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")


def sentence(rng: random.Random) -> str:
    """One grammatical sentence drawn from ``rng``; no digits, hyphens or all-caps words."""
    text = _SLOT.sub(lambda m: _SLOTS[m.group(1)](rng), rng.choice(TEMPLATES))
    text = _ARTICLE.sub(lambda m: m.group(1) + "n ", text)
    return text[0].upper() + text[1:]


def key_word(rng: random.Random) -> str:
    """A RULER-style "adjective-noun" key, e.g. "quiet-lantern"."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def real_words() -> list[str]:
    """Every distinct real word the module knows (sorted), for the word-extraction tasks."""
    verbs = [base for base, _ in TRANSITIVE]
    return sorted(set(ADJECTIVES + NOUNS + PLACES + verbs))


_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr", "pl"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m"]


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of two or three syllables ("brolam", "tikavu") when the real words run out."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.choice((2, 2, 3))))


def coded_word(rng: random.Random, length: int = 6) -> str:
    """RULER fwe's "coded" word: ``length`` random lowercase letters."""
    return "".join(rng.choices(string.ascii_lowercase, k=length))

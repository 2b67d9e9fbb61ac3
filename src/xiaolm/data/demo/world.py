"""A deterministic fictional world in Chinese (cities, people, products) and Chinese numerals."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

DIGITS = "零一二三四五六七八九"
UNITS = ["", "十", "百", "千"]

REGIONS = ["东州", "西州", "南州", "北州", "中州", "海州"]
SPECIALTIES = ["茶叶", "丝绸", "瓷器", "柑橘", "大米", "葡萄", "竹笋", "玉石", "棉花", "蜂蜜"]
RIVERS = ["清河", "白河", "金沙河", "青龙河", "落霞河", "玉带河", "松江", "明月河"]
PROFESSIONS = ["医生", "教师", "画家", "厨师", "工程师", "农民", "歌手", "木匠"]
COLOURS = ["红色", "蓝色", "绿色", "白色", "黑色", "黄色"]
PRODUCT_KINDS = ["茶壶", "自行车", "台灯", "雨伞", "书包", "风筝"]
# the three alphabets share no character, so no name is a substring of another kind of name
SURNAMES = "赵钱孙李周吴郑王冯陈褚卫蒋沈韩杨朱秦许何吕施张孔曹严华金魏陶姜"
NAME_CHARS = "澜泓霁珂瑶琛璟朔翊芷蘅筠岫曦昀晗湄沅漪霈骁峤珩琰"
CITY_CHARS = "青岚云溪桐霞枫澄翠泠沧瀚渚芜苍琅岱嵘澈汀璃霖栖蔚漾"


def to_chinese_numeral(n: int) -> str:
    """0..9999 in Chinese numerals: 零 for skipped places, 十五 but 一百一十五, 二千 (not 两千)."""
    if not 0 <= n <= 9999:
        raise ValueError(f"{n} is outside 0..9999")
    if n == 0:
        return "零"
    digits = [int(d) for d in str(n)]
    out, zero = [], False
    for i, d in enumerate(digits):
        place = len(digits) - 1 - i
        if d == 0:
            zero = True
            continue
        if zero and out:
            out.append("零")
        zero = False
        out.append(DIGITS[d] + UNITS[place])
    text = "".join(out)
    return text[1:] if 10 <= n <= 19 else text


def from_chinese_numeral(text: str) -> int:
    """Inverse of to_chinese_numeral (also reads 两 and 〇)."""
    text = text.strip().replace("两", "二").replace("〇", "零")
    if not text:
        raise ValueError("empty Chinese numeral")
    total, digit = 0, None
    for ch in text:
        if ch in DIGITS:
            digit = DIGITS.index(ch)
        elif ch in "十百千":
            total += (1 if digit is None else digit) * 10 ** (UNITS.index(ch))
            digit = None
        else:
            raise ValueError(f"not a Chinese numeral: {text!r}")
    return total + (digit or 0)


@dataclass
class City:
    """A city with its region, specialty and river."""

    name: str
    region: str
    specialty: str
    river: str


@dataclass
class Person:
    """A person with a hometown (a city name) and a profession."""

    name: str
    hometown: str
    profession: str


@dataclass
class Product:
    """A product with its maker (a person's name) and colour."""

    name: str
    maker: str
    colour: str


@dataclass
class World:
    """Every entity of the world; `held_out` names whose facts appear only in pretraining documents."""

    cities: list[City]
    people: list[Person]
    products: list[Product]
    held_out: set[str] = field(default_factory=set)

    def facts(self) -> list[tuple[str, str, str]]:
        """(subject, relation, object) triplets."""
        out = []
        for c in self.cities:
            out += [(c.name, "位于", c.region), (c.name, "特产", c.specialty), (c.name, "河流", c.river)]
        for p in self.people:
            out += [(p.name, "家乡", p.hometown), (p.name, "职业", p.profession)]
        for d in self.products:
            out += [(d.name, "制造者", d.maker), (d.name, "颜色", d.colour)]
        return out

    def value_set(self, relation: str) -> list[str]:
        """Every value the relation can take (its size gives the chance of a blind guess)."""
        return {"位于": REGIONS, "特产": SPECIALTIES, "河流": RIVERS, "职业": PROFESSIONS, "颜色": COLOURS,
                "家乡": [c.name for c in self.cities], "制造者": [p.name for p in self.people]}[relation]

    def names(self) -> list[str]:
        """Every entity name, cities first."""
        return [c.name for c in self.cities] + [p.name for p in self.people] + [d.name for d in self.products]

    def size_summary(self) -> dict:
        """Counts for the report."""
        facts = self.facts()
        return {"entities": len(self.names()), "cities": len(self.cities), "people": len(self.people),
                "products": len(self.products), "facts": len(facts), "held_out_entities": len(self.held_out),
                "held_out_facts": sum(1 for s, _, _ in facts if s in self.held_out)}


def _unique_names(n: int, make: Callable[[], str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = make()
        if name not in names:
            names.append(name)
    return names


def generate_world(seed: int = 0, n_cities: int = 40, n_people: int = 24, n_products: int = 12,
                   held_out_fraction: float = 0.3) -> World:
    """Build a consistent world; a fraction of cities and people is held out of all SFT data."""
    rng = random.Random(seed)
    # two different syllables a name: no 云云城 (云云 is a word)
    city_names = _unique_names(n_cities, lambda: "".join(rng.sample(CITY_CHARS, 2)) + "城")
    people_names = _unique_names(n_people, lambda: rng.choice(SURNAMES) + "".join(rng.sample(NAME_CHARS, 2)))
    product_names = _unique_names(n_products, lambda: "".join(rng.sample(NAME_CHARS, 2)) + "牌"
                                  + rng.choice(PRODUCT_KINDS))
    held_cities = set(rng.sample(city_names, round(n_cities * held_out_fraction)))
    held_people = set(rng.sample(people_names, round(n_people * held_out_fraction)))
    # entities used for SFT only point at other SFT entities, so no held-out name leaks into an answer
    train_cities = [c for c in city_names if c not in held_cities]
    train_people = [p for p in people_names if p not in held_people]
    cities = [City(n, rng.choice(REGIONS), rng.choice(SPECIALTIES), rng.choice(RIVERS)) for n in city_names]
    people = [Person(n, rng.choice(city_names if n in held_people else train_cities), rng.choice(PROFESSIONS))
              for n in people_names]
    products = [Product(n, rng.choice(train_people), rng.choice(COLOURS)) for n in product_names]
    return World(cities, people, products, held_cities | held_people)

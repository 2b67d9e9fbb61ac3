"""Chinese phrasings shared by the demo's documents, chats and evaluation sets."""

from __future__ import annotations

from xiaolm.data.demo.world import to_chinese_numeral

# declarative templates, {s} subject and {o} object; the first one is also the answer form of QUESTIONS
STATEMENTS = {
    "位于": ["{s}位于{o}。", "{s}是{o}的一座城市。", "在{o}，有一座城市叫{s}。", "{s}属于{o}管辖。",
           "从地图上看，{s}在{o}境内。", "{s}坐落于{o}。"],
    "特产": ["{s}的特产是{o}。", "{s}盛产{o}。", "说起{s}，人们会想到当地的{o}。", "{o}是{s}最有名的特产。",
           "{s}出产的{o}远近闻名。", "去{s}的人，大多会带些当地的{o}回家。"],
    "河流": ["{s}的河流是{o}。", "{o}流经{s}。", "{s}坐落在{o}边。", "{s}人喝着{o}的水长大。",
           "{o}缓缓流过{s}。"],
    "家乡": ["{s}的家乡是{o}。", "{s}来自{o}。", "{s}出生在{o}。", "{s}是{o}人。", "{s}从小在{o}长大。"],
    "职业": ["{s}的职业是{o}。", "{s}是一名{o}。", "{s}做{o}已经很多年了。", "{s}以{o}为业。",
           "大家都知道{s}是个{o}。"],
    "制造者": ["{s}的制造者是{o}。", "{s}由{o}制造。", "{o}做出了{s}。", "{s}是{o}亲手设计制造的。"],
    "颜色": ["{s}的颜色是{o}。", "{s}是{o}的。", "人们一眼就能认出{o}的{s}。", "{s}通体{o}。"],
}
# the last statement of each relation is kept out of every training file: the world's validation documents state
# the known facts in these phrasings only, so their perplexity measures generalization, not recall of sentences
TRAIN_STATEMENTS = {r: ts[:-1] for r, ts in STATEMENTS.items()}
VALIDATION_STATEMENTS = {r: ts[-1:] for r, ts in STATEMENTS.items()}
# question phrasings and the one reference answer form
QUESTIONS = {
    "位于": (["{s}位于哪里？", "{s}在哪个州？", "请问{s}属于哪个州？"], "它位于{o}。"),
    "特产": (["{s}的特产是什么？", "{s}有什么特产？", "{s}盛产什么？"], "它的特产是{o}。"),
    "河流": (["{s}的河流是哪条？", "哪条河流经{s}？", "{s}坐落在哪条河边？"], "它的河流是{o}。"),
    "家乡": (["{s}的家乡是哪里？", "{s}是哪里人？", "{s}来自哪座城市？"], "家乡是{o}。"),
    "职业": (["{s}的职业是什么？", "{s}是做什么工作的？", "{s}从事什么职业？"], "职业是{o}。"),
    "制造者": (["{s}是谁制造的？", "{s}的制造者是谁？"], "它的制造者是{o}。"),
    "颜色": (["{s}是什么颜色的？", "{s}的颜色是什么？"], "它的颜色是{o}。"),
}
# answers name only the value, never the subject: a tiny model fails at copying a name it never saw in SFT,
# which would hide whether it knows the fact
NUMERAL_STATEMENTS = ["{d}写作{c}。", "{c}写成阿拉伯数字是{d}。", "阿拉伯数字{d}读作{c}。"]
TO_CHINESE = ["把{d}写成中文数字。", "{d}用中文数字怎么写？", "请把{d}写成汉字。"]
TO_ARABIC = ["“{c}”用阿拉伯数字怎么写？", "把“{c}”写成阿拉伯数字。"]
ARITH_QUESTIONS = ["{q}等于多少？", "请计算：{q}。", "{q}是多少？"]
IDIOM_QUESTIONS = ["“{w}”是什么意思？", "成语“{w}”是什么意思？", "请解释成语“{w}”。"]


def arithmetic_question(a: int, op: str, b: int) -> tuple[str, str]:
    """(“三十七加二十五”, “六十二”) for (37, "+", 25)."""
    word = "加" if op == "+" else "减"
    result = a + b if op == "+" else a - b
    return f"{to_chinese_numeral(a)}{word}{to_chinese_numeral(b)}", to_chinese_numeral(result)

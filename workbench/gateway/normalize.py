"""Text folding for the sensitive-word filter, so look-alike spellings of a listed word match it.

``fold(text)`` maps every character on its own (no context), so a text folds to the concatenation
of its characters' folds: a stream cut anywhere folds the same, and a match in the folded text
maps back to a span of the original (``index_map``). Per character:

1. NFKD, the compatibility decomposition: full-width ``ｂａｄ`` -> ``bad``, ligatures, circled and
   super-scripted letters, ``é`` -> ``e`` + a combining accent.
2. Dropped: what renders as nothing. Format characters (Cf: U+200B zero-width space, U+00AD soft
   hyphen, joiners, U+2060, U+FEFF, tag characters), Unicode's Default_Ignorable_Code_Point set
   (``_IGNORABLE``: U+17B4/5 Khmer inherent vowels, U+180B-F Mongolian selectors, U+FFF0-8, the
   Hangul fillers, variation selectors), unassigned code points (Cn), and every nonspacing or
   enclosing mark (Mn, Me: accents, overlays, U+0483 Cyrillic titlo) but those of scripts whose
   marks are letters (``_MARK_SCRIPTS``: Hebrew, Arabic, Indic, Thai, Tibetan, Myanmar, kana
   voicing): dropping those would merge different words.
3. Look-alikes folded to the Latin letter they imitate (``LOOKALIKES``): Cyrillic and Greek
   letters, Latin letters that NFKD leaves alone but whose name says which letter they are
   (``ɑ`` ALPHA, ``ø`` O WITH STROKE, ``đ``, ``ʙ`` SMALL CAPITAL B: ``_latin_lookalikes``), the
   Lisu letters (Fraser's alphabet, made from Latin capitals), and parenthesized letters (``⒝``,
   whose NFKD is ``(b)``); then lowercase. A curated subset of Unicode's confusables (UTS #39),
   chosen for letters that render as a Latin one in common fonts.
4. Traditional Chinese characters folded to simplified ones (``HANT_TO_HANS``: a character-level
   table of ~700 common characters that differ, not OpenCC's phrase-level conversion; a rarer
   traditional character still passes, so list both forms of a word where it matters), and the
   Japanese forms of common kanji that differ from both (``JA_TO_HANS``: ``弾`` -> ``弹``).

Whitespace and punctuation are handled by the matcher (filter.py), not here, since they are
about runs of characters: any run of whitespace matches one space of a word, and Han / kana /
Hangul words also match with the whitespace and punctuation between their characters removed.

The results are cached per character (``str.translate`` with a caching table), and only runs of
characters that may change are looked up (``_stable_class``): ASCII text is ``str.lower``, and
Chinese text passes at C speed but for its full-width punctuation.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right

# Cyrillic and Greek letters that look like a Latin letter (upper case folds through lower()).
LOOKALIKES = dict(zip(
    "аеорсухѕіїјԁԛԝһӏкьАВЕКМНОРСТХУЅІЈαορνικυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧıɡ",
    "aeopcyxsiijdqwhlkbabekmhopctxysijaopvikuxabezhikmnoptyxig"))

# Traditional -> simplified, for characters that differ (pairs: traditional, then simplified).
HANT_TO_HANS = dict(p for p in """
萬万 與与 專专 業业 東东 絲丝 兩两 嚴严 個个 豐丰 臨临 為为 麗丽 舉举 義义 烏乌 樂乐 喬乔 習习 鄉乡
書书 買买 亂乱 爭争 於于 虧亏 雲云 亞亚 產产 畝亩 親亲 億亿 僅仅 從从 侖仑 倉仓 儀仪 們们 價价 眾众
優优 會会 傘伞 偉伟 傳传 傷伤 倫伦 偽伪 體体 餘余 來来 係系 侶侣 側侧 偵侦 備备 債债 傾倾 僑侨 儲储
兒儿 黨党 蘭兰 關关 興兴 養养 獸兽 內内 岡冈 冊册 寫写 軍军 農农 馮冯 衝冲 決决 況况 凍冻 淨净 準准
涼凉 減减 湊凑 幾几 鳳凤 憑凭 凱凯 擊击 鑿凿 劃划 劉刘 則则 剛刚 創创 刪删 別别 剝剥 劇剧 勸劝 辦办
務务 動动 勵励 勁劲 勞劳 勢势 勳勋 勝胜 區区 醫医 華华 協协 單单 賣卖 盧卢 衛卫 卻却 廠厂 廳厅 曆历
歷历 壓压 厭厌 參参 雙双 變变 敘叙 疊叠 葉叶 號号 嘆叹 後后 嚇吓 呂吕 嗎吗 噸吨 聽听 啟启 吳吴 員员
響响 問问 啞哑 喚唤 喪丧 嗆呛 嘗尝 囑嘱 團团 園园 圍围 國国 圖图 圓圆 聖圣 場场 壞坏 塊块 堅坚 壇坛
壩坝 墳坟 墜坠 壘垒 墾垦 牆墙 聲声 殼壳 處处 復复 頭头 誇夸 夾夹 奪夺 獎奖 奧奥 婦妇 媽妈 嫵妩 孫孙
學学 寧宁 寶宝 實实 寵宠 審审 憲宪 宮宫 寬宽 賓宾 對对 尋寻 導导 將将 爾尔 塵尘 層层 屬属 屍尸 歲岁
豈岂 島岛 嶺岭 嶽岳 崗岗 幣币 師师 帥帅 帳帐 帶带 幫帮 幹干 並并 廣广 慶庆 廬庐 庫库 應应 廟庙 廢废
開开 異异 棄弃 張张 彌弥 彎弯 彈弹 強强 歸归 當当 錄录 彙汇 徹彻 徑径 徵征 憶忆 懷怀 態态 憐怜 總总
戀恋 懇恳 惡恶 惱恼 懸悬 驚惊 慣惯 憤愤 願愿 懶懒 戲戏 戰战 戶户 撲扑 執执 擴扩 掃扫 揚扬 擾扰 撫抚
拋抛 搶抢 護护 報报 擔担 擬拟 攏拢 揀拣 擁拥 攔拦 擰拧 撥拨 擇择 掛挂 擋挡 撈捞 損损 換换 揮挥 據据
擄掳 擠挤 攜携 攝摄 擺摆 搖摇 擲掷 攤摊 敵敌 數数 斂敛 斃毙 鬥斗 斬斩 斷断 時时 曠旷 晝昼 顯显 晉晋
曬晒 曉晓 暈晕 暫暂 術术 機机 殺杀 雜杂 權权 條条 楊杨 極极 構构 樞枢 棗枣 櫃柜 檸柠 標标 欄栏 樹树
樣样 橋桥 檢检 樓楼 槍枪 榮荣 殘残 殞殒 毀毁 氣气 漢汉 湯汤 溝沟 沒没 滬沪 淚泪 潑泼 澤泽 潔洁 灑洒
濃浓 濤涛 漲涨 淺浅 滅灭 湧涌 濕湿 溫温 滿满 濾滤 濫滥 潛潜 澀涩 滲渗 灣湾 濟济 測测 漁渔 灘滩 災灾
燈灯 爐炉 點点 煉炼 爍烁 爛烂 熱热 煙烟 燒烧 燭烛 營营 愛爱 爺爷 牽牵 犧牺 狀状 獨独 狹狭 獵猎 貓猫
獻献 猶犹 獄狱 環环 現现 瑪玛 璽玺 瓊琼 畫画 暢畅 療疗 癢痒 瘋疯 盡尽 監监 盤盘 蓋盖 盜盗 睜睁 礎础
確确 碼码 磚砖 礦矿 禮礼 禍祸 禪禅 離离 種种 稱称 積积 穩稳 穀谷 窮穷 竊窃 競竞 筆笔 節节 範范 築筑
簡简 籃篮 類类 糧粮 緊紧 縱纵 紅红 約约 級级 紀纪 純纯 紙纸 紡纺 細细 終终 組组 經经 結结 給给 絕绝
統统 網网 綱纲 綠绿 維维 綜综 線线 練练 織织 繪绘 繼继 續续 纜缆 罰罚 罷罢 羅罗 聯联 聰聪 職职 肅肃
腸肠 膚肤 腦脑 腳脚 臉脸 臟脏 艦舰 艱艰 藝艺 蘋苹 莊庄 蒼苍 蔣蒋 藥药 蘇苏 蟲虫 蝦虾 螞蚂 蠶蚕 蠟蜡
補补 裝装 裡里 製制 複复 襯衬 見见 觀观 規规 視视 覺觉 覽览 觸触 計计 訂订 認认 討讨 讓让 訓训 議议
記记 講讲 許许 論论 設设 訪访 證证 評评 識识 詞词 試试 詩诗 話话 該该 詳详 誠诚 誤误 說说 請请 諸诸
讀读 課课 誰谁 調调 談谈 謀谋 謝谢 謊谎 謎谜 譯译 譽誉 讚赞 豬猪 貝贝 貞贞 負负 財财 貢贡 貨货 販贩
貧贫 責责 貪贪 購购 貫贯 貴贵 費费 貿贸 賀贺 資资 賊贼 賄贿 賂赂 賭赌 賠赔 賞赏 賤贱 賦赋 質质 賬账
賴赖 賺赚 贈赠 贏赢 趕赶 趙赵 趨趋 躍跃 蹤踪 踐践 車车 軌轨 軟软 轉转 輪轮 較较 載载 輔辅 輕轻 輸输
辭辞 邊边 遼辽 達达 遷迁 過过 邁迈 運运 還还 這这 進进 遠远 違违 連连 遲迟 適适 選选 遺遗 邏逻 鄭郑
鄰邻 醜丑 醞酝 釀酿 釋释 鑒鉴 針针 釣钓 鈕钮 鋼钢 鈴铃 鉛铅 銀银 銅铜 鋒锋 錯错 錢钱 錦锦 鍵键 鎖锁
鏡镜 鐘钟 鐵铁 鑰钥 長长 門门 閃闪 閉闭 閒闲 間间 閱阅 闊阔 闖闯 隊队 陽阳 陰阴 陣阵 階阶 際际 陸陆
險险 隨随 隱隐 隸隶 難难 雞鸡 電电 霧雾 靈灵 靜静 韓韩 頁页 頂顶 項项 順顺 須须 預预 領领 頻频 顆颗
題题 額额 顏颜 顧顾 風风 飛飞 飯饭 飲饮 飽饱 飾饰 餅饼 餓饿 館馆 饑饥 馬马 駕驾 駛驶 驗验 騙骗 騎骑
驅驱 鬆松 魚鱼 鮮鲜 鳥鸟 鴨鸭 鵝鹅 鷹鹰 鹽盐 麥麦 黃黄 齊齐 齒齿 龍龙 龜龟 穢秽 詐诈 顛颠 緝缉 劑剂
癮瘾 鴉鸦 薩萨 憂忧 鬱郁 濱滨 鋁铝 鑽钻 頸颈 麼么 隻只 髮发 發发 臺台 蔔卜 捨舍 佈布 麵面 籲吁 嚮向
""".split())

# Japanese (shinjitai) forms of kanji that differ from the simplified and the traditional form.
JA_TO_HANS = dict(p for p in """
弾弹 薬药 剤剂 覚觉 売卖 読读 続续 経经 転转 軽轻 験验 険险 検检 権权 歓欢 観观 関关 戦战 銭钱
鉄铁 銃铳 殺杀 爆爆 発发 対对 図图 総总 縦纵 従从 鋭锐 稲稻 悪恶 圧压 囲围 医医 為为 営营 栄荣
駅驿 円圆 応应 桜樱 穏稳 仮假 価价 画画 会会 絵绘 拡扩 学学 楽乐 気气 帰归 挙举 拠据 区区 径径
恵惠 掲揭 鶏鸡 芸艺 撃击 県县 剣剑 広广 砿矿 鉱矿 号号 国国 済济 砕碎 雑杂 参参 惨惨 蚕蚕 桟栈
残残 糸丝 歯齿 児儿 辞辞 湿湿 実实 写写 釈释 寿寿 収收 獣兽 縦纵 粛肃 処处 焼烧 奨奖 条条 状状
乗乘 浄净 畳叠 嬢娘 譲让 醸酿 触触 寝寝 慎慎 尽尽 図图 粋粹 酔醉 随随 髄髓 数数 枢枢 声声 静静
窃窃 摂摄 浅浅 践践 潜潜 繊纤 禅禅 双双 捜搜 挿插 巣巢 争争 荘庄 装装 僧僧 層层 騒骚 増增 蔵藏
臓脏 即即 属属 堕堕 駄驮 体体 帯带 滞滞 台台 滝泷 沢泽 担担 胆胆 団团 断断 弾弹 遅迟 昼昼 虫虫
鋳铸 庁厅 徴征 聴听 鎮镇 逓递 鉄铁 点点 伝传 灯灯 当当 党党 盗盗 稲稻 闘斗 独独 読读 届届 弐贰
悩恼 脳脑 廃废 売卖 麦麦 発发 髪发 抜拔 晩晚 蛮蛮 秘秘 浜滨 瓶瓶 払拂 仏佛 併并 変变 辺边 弁辩
歩步 宝宝 豊丰 褒褒 没没 翻翻 万万 満满 黙默 訳译 薬药 予预 余余 与与 誉誉 揺摇 様样 謡谣 来来
頼赖 乱乱 覧览 竜龙 両两 猟猎 緑绿 塁垒 涙泪 励励 礼礼 霊灵 齢龄 恋恋 炉炉 労劳 楼楼 録录 湾湾
""".split() if p[0] != p[1])

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) outside Cf, which is dropped whole.
_IGNORABLE = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
              (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
              (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
# Scripts whose nonspacing marks are vowels or consonant signs: kept (Hebrew, Arabic, Syriac..,
# Indic, Thai, Lao, Tibetan, Myanmar, Khmer but its two invisible vowels, kana voicing marks).
_MARK_SCRIPTS = ((0x0591, 0x08FF), (0x0900, 0x0DFF), (0x0E00, 0x0FFF), (0x1000, 0x109F),
                 (0x1780, 0x17FF), (0x3099, 0x309A))
# Lisu letters (U+A4D0-A4F7) that are Latin capitals in form; the turned ones are left alone.
_LISU = dict(zip("ꓐꓑꓒꓓꓔꓖꓗꓙꓚꓜꓝꓟꓠꓡꓢꓣꓦꓧꓪꓫꓬꓮꓰꓲꓳꓴ", "bpddtgkjczfmnlsrvhwxyaeiou"))
_LATIN_NAME = re.compile(r"LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL |SCRIPT |DOTLESS |"
                         r"SIDEWAYS |BARRED |TURNED )?([A-Z])(?: WITH .*)?$")
_CACHE_MAX = 65536  # distinct characters cached; a text of every code point cannot grow it further
# Whitespace, punctuation and symbols (re's \W is Unicode-aware), but the clause and sentence
# marks (after folding: ，->, ！->!), which end a phrase: 敏.感.词 is one word in disguise, 敏感，词语
# two phrases.
_BOUNDARY = ",;:!?。、"
_SPACE = re.compile(f"(?![{_BOUNDARY}])[\\W_]")
_NONSPACE = re.compile(f"[^\\W_]|[{_BOUNDARY}]")
_WS_RUN = re.compile(r"\s+")
_OTHER_SPACE = re.compile(r"[^\S ]")
_ODD_RUN = re.compile(r"\s{2,}|[^\S ]")  # a run of 2+ whitespace characters, or one not a space
_OTHER_WS = [chr(o) for o in range(0x3001) if chr(o).isspace() and o != 32]  # \t \n .. U+3000
_ASCII_WS = [c for c in _OTHER_WS if c.isascii()]  # \t \n \v \f \r \x1c-\x1f
_CJK = "\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003ffff"
_CJK_GAP = re.compile(f"[{_CJK}](?:[^\\w,;:!?。、]|_)+[{_CJK}]")
_CJK_SEG = re.compile(f"[{_CJK}](?:(?:[^\\w,;:!?。、]|_)*[{_CJK}])+")


def _latin_lookalikes() -> dict[str, str]:
    """Latin letters NFKD leaves alone that are a basic letter in disguise, by their Unicode name
    (``LATIN SMALL LETTER D WITH STROKE`` -> d; ``... LETTER SMALL CAPITAL B`` -> b), plus ALPHA."""
    out = {}
    for lo, hi in ((0x00C0, 0x024F), (0x0250, 0x02AF), (0x1D00, 0x1DBF), (0x2C60, 0x2C7F),
                   (0xA720, 0xA7FF), (0xAB30, 0xAB6F)):
        for o in range(lo, hi + 1):
            c = chr(o)
            if len(unicodedata.normalize("NFKD", c)) > 1:
                continue  # NFKD decomposes it already (é = e + accent)
            name = unicodedata.name(c, "")
            m = _LATIN_NAME.match(name)
            if m and "TURNED" not in name and "REVERSED" not in name:
                out[c] = m.group(1).lower()
            elif name.endswith(("LETTER ALPHA", "LETTER SMALL CAPITAL ALPHA")):
                out[c] = "a"
    return out


LOOKALIKES.update(_latin_lookalikes())
LOOKALIKES.update(_LISU)


def _dropped(ch: str) -> bool:
    o = ord(ch)
    cat = unicodedata.category(ch)
    if cat == "Cf" or cat == "Cn" or any(a <= o <= b for a, b in _IGNORABLE):
        return True
    return cat in ("Mn", "Me") and not any(a <= o <= b for a, b in _MARK_SCRIPTS)


def fold_char(c: str) -> str:
    out = []
    nfkd = unicodedata.normalize("NFKD", c)
    if len(nfkd) == 3 and nfkd[0] == "(" and nfkd[2] == ")" and nfkd[1].isalnum():
        nfkd = nfkd[1]  # ⒝ -> (b) -> b: a parenthesized letter is that letter
    for ch in nfkd:
        if _dropped(ch):
            continue
        for low in LOOKALIKES.get(ch, ch).lower():
            low = LOOKALIKES.get(low, low)
            low = HANT_TO_HANS.get(low, low)
            out.append(JA_TO_HANS.get(low, low))
    return "".join(out)


class _FoldTable(dict):
    """ord -> folded text, filled on first use (``str.translate`` calls ``__missing__``)."""

    def __missing__(self, o: int) -> str:
        v = fold_char(chr(o))
        if len(self) < _CACHE_MAX:
            self[o] = v
        return v


FOLD = _FoldTable()
def _stable_class() -> str:
    """A regex class of characters that fold to themselves (tests/test_gateway_filter.py checks
    every one): ASCII but A-Z, common CJK punctuation, and the Han block without the traditional
    characters of HANT_TO_HANS. Text is folded run by run of the other characters only, so
    Chinese text mostly passes at C speed (its full-width ，？！ are such runs)."""
    ranges, lo = [], 0x4E00
    for o in sorted({o for o in map(ord, [*HANT_TO_HANS, *JA_TO_HANS]) if 0x4E00 <= o <= 0x9FFF}):
        if o > lo:
            ranges.append((lo, o - 1))
        lo = o + 1
    ranges.append((lo, 0x9FFF))
    return "\\x00-\\x40\\x5b-\\x7f\\u3001-\\u3003\\u3008-\\u3011\\u3014-\\u301f" + "".join(
        f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


_UNSTABLE = re.compile(f"[^{_stable_class()}]+")


def _fold_run(m: re.Match) -> str:
    return m.group().translate(FOLD)


def fold(text: str) -> str:
    """The folded text: the concatenation of ``fold_char`` of each character."""
    if text.isascii():
        return text.lower()
    return _UNSTABLE.sub(_fold_run, text)


def index_map(text: str) -> list[int] | range:
    """For each character of ``fold(text)``, the index of the character of ``text`` it came from."""
    if text.isascii() or _UNSTABLE.search(text) is None:
        return range(len(text))
    idx: list[int] = []
    pos = 0
    for m in _UNSTABLE.finditer(text):  # stable characters map one to one, in C
        idx.extend(range(pos, m.start()))
        for i in range(m.start(), m.end()):
            idx += [i] * len(FOLD[ord(text[i])])
        pos = m.end()
    idx.extend(range(pos, len(text)))
    return idx


class _DropTable(dict):
    """ord -> None for what ``drop_spaces`` removes, else the character (``str.translate``)."""

    def __missing__(self, o: int):
        v = None if _SPACE.match(chr(o)) else chr(o)
        if len(self) < _CACHE_MAX:
            self[o] = v
        return v


_DROP = _DropTable()


def drop_spaces(folded: str) -> str:
    """``folded`` without whitespace and punctuation (for Han / kana / Hangul words: 敏.感.词)."""
    return folded.translate(_DROP)


def nonspace_positions(folded: str) -> list[int]:
    """Index in ``folded`` of each character of ``drop_spaces(folded)``."""
    return [m.start() for m in _NONSPACE.finditer(folded)]


def squeeze(folded: str) -> tuple[str, list[tuple[int, int]]]:
    """``folded`` with each run of whitespace as one space (a word's spaces match any run), and
    the runs [start, end) that were rewritten, for ``unsqueeze``."""
    if not odd_spaces(folded):
        return folded, []
    return squeeze_text(folded), runs_of(folded)


def unsqueeze(runs: list[tuple[int, int]]):
    """A function from an index of ``squeeze``'s text to the index in the folded text."""
    starts, shifts, removed = [], [], 0
    for a, b in runs:
        starts.append(a - removed + 1)  # the first character after the kept space
        removed += b - a - 1
        shifts.append(removed)

    def to_folded(p: int) -> int:
        i = bisect_right(starts, p)
        return p + (shifts[i - 1] if i else 0)
    return to_folded


def odd_spaces(text: str) -> bool:
    """Whether ``text`` holds whitespace other than single spaces (the matcher must squeeze it).
    ``str.isprintable`` answers most texts in one C pass: every whitespace character but the
    ASCII space is unprintable (categories Zs, Zl, Zp, Cc; tests/test_gateway_filter.py checks
    every code point). Otherwise substring tests (memchr-fast: ~0.5 us on a 200-character prompt),
    a one-class regex for short non-ASCII text, and substring tests again for long text."""
    if "  " in text:
        return True
    if text.isprintable():
        return False
    if text.isascii():
        return any(c in text for c in _ASCII_WS)
    if len(text) < 4096:
        return _OTHER_SPACE.search(text) is not None
    return any(c in text for c in _OTHER_WS)


def squeeze_text(folded: str) -> str:
    """``squeeze(folded)[0]`` in C (``str.split``): each whitespace run as one space."""
    if not odd_spaces(folded):
        return folded
    core = " ".join(folded.split())
    if not core:
        return " " if folded else ""
    return (" " if folded[0].isspace() else "") + core + (" " if folded[-1].isspace() else "")


def runs_of(folded: str) -> list[tuple[int, int]]:
    """The whitespace runs ``squeeze`` rewrites (for ``unsqueeze``), computed only on a match."""
    return [(m.start(), m.end()) for m in _ODD_RUN.finditer(folded)]


def cjk_segments(folded: str):
    """Runs of Han / kana / Hangul characters with only whitespace or (non-clause) punctuation
    between them: where an unspaced word can hide (敏.感.词). Matches of ``_CJK_SEG``."""
    if _CJK_GAP.search(folded) is None:  # no gap between two such characters anywhere
        return ()
    return _CJK_SEG.finditer(folded)


def unspaced_script(word: str) -> bool:
    """True for words written without spaces between words (Han, kana, Hangul): only these are
    matched space-insensitively, so an English word never matches across a word boundary."""
    return bool(word) and all(0x2E80 <= ord(c) <= 0x9FFF or 0xAC00 <= ord(c) <= 0xD7AF or
                              0xF900 <= ord(c) <= 0xFAFF or 0x1100 <= ord(c) <= 0x11FF or
                              0x20000 <= ord(c) <= 0x3FFFF for c in word)

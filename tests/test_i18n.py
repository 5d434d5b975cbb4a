"""The Simplified Chinese catalogue is complete, compiled, and actually served.

The .po is read with a small parser of our own (polib is not a dependency); the
committed .mo is checked against it with the standard library's gettext, and,
where GNU msgfmt is installed, against a fresh compilation too.
"""

import gettext
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import translation

pytestmark = pytest.mark.django_db

LC_MESSAGES = Path(settings.BASE_DIR) / "locale" / "zh_Hans" / "LC_MESSAGES"
PO_FILE = LC_MESSAGES / "django.po"
MO_FILE = LC_MESSAGES / "django.mo"
PLACEHOLDER = re.compile(r"%\((\w+)\)[sdifr]|\{\{\s*\w+\s*\}\}")
ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


@dataclass
class Entry:
    msgid: str = ""
    msgid_plural: str | None = None
    msgstrs: dict[int, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    msgctxt: str | None = None
    line: int = 0


def _unquote(text: str) -> str:
    text = text.strip()
    assert text.startswith('"') and text.endswith('"'), f"not a PO string: {text!r}"
    return re.sub(r"\\(.)", lambda m: ESCAPES[m.group(1)], text[1:-1])


def parse_po(path: Path) -> list[Entry]:
    """Entries of a .po file, the header included (msgid ""). Obsolete (#~) entries are ignored."""
    entries: list[Entry] = []
    entry = Entry()
    target: tuple[str, int | None] | None = None
    seen_msgid = False

    def finish():
        nonlocal entry, seen_msgid, target
        if seen_msgid:
            entries.append(entry)
        entry, seen_msgid, target = Entry(), False, None

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            finish()
        elif line.startswith("#,"):
            if seen_msgid:
                finish()
            entry.flags |= {flag.strip() for flag in line[2:].split(",")}
        elif line.startswith("#"):
            if seen_msgid:
                finish()
        elif line.startswith('"'):
            assert target is not None, f"{path}:{number}: continuation line outside an entry"
            kind, index = target
            if kind == "msgstr":
                entry.msgstrs[index] += _unquote(line)
            else:
                setattr(entry, kind, getattr(entry, kind) + _unquote(line))
        else:
            keyword, _, rest = line.partition(" ")
            match = re.fullmatch(r"msgstr\[(\d+)\]", keyword)
            if keyword == "msgctxt":
                if seen_msgid:
                    finish()
                entry.msgctxt, target = _unquote(rest), ("msgctxt", None)
            elif keyword == "msgid":
                if seen_msgid:
                    finish()
                entry.msgid, entry.line, seen_msgid, target = _unquote(rest), number, True, ("msgid", None)
            elif keyword == "msgid_plural":
                entry.msgid_plural, target = _unquote(rest), ("msgid_plural", None)
            elif keyword == "msgstr" or match:
                index = int(match.group(1)) if match else 0
                entry.msgstrs[index], target = _unquote(rest), ("msgstr", index)
            else:
                raise AssertionError(f"{path}:{number}: cannot read {line!r}")
    finish()
    return entries


def expected_catalog(entries: list[Entry]) -> dict:
    """What gettext should find in a .mo compiled from these entries (as GNUTranslations keys it)."""
    catalog = {}
    for entry in entries:
        if not entry.msgid or "fuzzy" in entry.flags:
            continue
        msgid = f"{entry.msgctxt}\x04{entry.msgid}" if entry.msgctxt is not None else entry.msgid
        if entry.msgid_plural is None:
            catalog[msgid] = entry.msgstrs[0]
        else:
            catalog.update({(msgid, index): text for index, text in entry.msgstrs.items()})
    return catalog


def mo_catalog(path: Path) -> dict:
    with path.open("rb") as handle:
        catalog = dict(gettext.GNUTranslations(handle)._catalog)
    catalog.pop("", None)  # the header
    return catalog


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    assert PO_FILE.exists(), f"{PO_FILE} is missing: run makemessages --locale zh_Hans"
    return parse_po(PO_FILE)


def messages_of(entries: list[Entry]) -> list[Entry]:
    return [entry for entry in entries if entry.msgid]


# --- The catalogue -------------------------------------------------------------


def test_header_declares_simplified_chinese_with_one_plural_form(entries):
    header = next(entry for entry in entries if not entry.msgid)
    assert "fuzzy" not in header.flags
    assert "Language: zh_Hans\n" in header.msgstrs[0]
    assert "Plural-Forms: nplurals=1; plural=0;\n" in header.msgstrs[0]
    assert "charset=UTF-8" in header.msgstrs[0]


def test_every_message_is_translated_and_none_is_fuzzy(entries):
    messages = messages_of(entries)
    assert len(messages) > 100, "the catalogue looks truncated"
    fuzzy = [f"line {e.line}: {e.msgid!r}" for e in messages if "fuzzy" in e.flags]
    assert not fuzzy, "fuzzy entries:\n" + "\n".join(fuzzy)
    untranslated = [f"line {e.line}: {e.msgid!r}" for e in messages if not all(s.strip() for s in e.msgstrs.values())]
    assert not untranslated, "untranslated entries:\n" + "\n".join(untranslated)


def test_plural_entries_have_exactly_one_form(entries):
    plurals = [e for e in messages_of(entries) if e.msgid_plural is not None]
    wrong = [f"line {e.line}: {e.msgid!r}" for e in plurals if sorted(e.msgstrs) != [0]]
    assert not wrong, "Chinese has one plural form (msgstr[0] only):\n" + "\n".join(wrong)


def test_translations_keep_every_placeholder(entries):
    wrong = []
    for entry in messages_of(entries):
        source = PLACEHOLDER.findall(entry.msgid) + PLACEHOLDER.findall(entry.msgid_plural or "")
        for text in entry.msgstrs.values():
            if sorted(set(PLACEHOLDER.findall(text))) != sorted(set(source)):
                wrong.append(f"line {entry.line}: {entry.msgid!r} → {text!r}")
    assert not wrong, "placeholders differ:\n" + "\n".join(wrong)


def test_technical_identifiers_are_left_untranslated(entries):
    translations = {entry.msgid: entry.msgstrs[0] for entry in messages_of(entries)}
    assert "Authorization: Bearer <token>" in translations["Use it as: Authorization: Bearer <token>"]
    for msgid, text in translations.items():
        for identifier in ("ed25519", "ECDSA", "RSA", "SSH", "API", "GPU", "A100", "cloud-init"):
            if identifier in msgid:
                assert identifier in text, f"{identifier!r} lost in {msgid!r} → {text!r}"


def test_committed_mo_matches_the_po(entries):
    """The .mo shipped next to the .po holds exactly what the .po says (recompile after editing the .po)."""
    assert MO_FILE.exists(), f"{MO_FILE} is missing: run compilemessages --locale zh_Hans"
    assert mo_catalog(MO_FILE) == expected_catalog(entries), "django.mo is stale: run compilemessages"


@pytest.mark.skipif(shutil.which("msgfmt") is None, reason="GNU msgfmt (gettext) is not installed")
def test_committed_mo_matches_a_fresh_msgfmt_compile(tmp_path):
    fresh = tmp_path / "django.mo"
    result = subprocess.run(
        ["msgfmt", "--check", "--statistics", "-o", str(fresh), str(PO_FILE)],
        capture_output=True,
        text=True,
        check=False,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "fuzzy" not in result.stderr and "untranslated" not in result.stderr, result.stderr
    assert mo_catalog(MO_FILE) == mo_catalog(fresh), "django.mo is stale: run compilemessages"


def test_django_finds_the_catalogue():
    with translation.override("zh-hans"):
        assert translation.gettext("Team") == "团队"
        assert translation.gettext("Two-factor authentication") == "双因素认证"
    with translation.override("en"):
        assert translation.gettext("Team") == "Team"


# --- Pages ---------------------------------------------------------------------


def test_pages_render_in_chinese_for_accept_language_zh_hans(client, user, tenant):
    client.force_login(user)
    page = client.get("/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert '<html lang="zh-hans">' in page
    for text in ("概览", "算力", "任务", "团队", "设置", "退出登录", "配额与当前用量", "快速开始", "普通"):
        assert text in page, text
    assert ">Team<" not in page

    page = client.get("/team/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert '<html lang="zh-hans">' in page
    for text in ("团队", "成员", "角色", "邀请成员", "发送邀请", "所有者", "只读成员"):
        assert text in page, text


def test_a_browsers_zh_cn_accept_language_gets_simplified_chinese(client, user, tenant):
    client.force_login(user)
    page = client.get("/team/", HTTP_ACCEPT_LANGUAGE="zh-CN,zh;q=0.9,en;q=0.8").content.decode()
    assert '<html lang="zh-hans">' in page
    assert "邀请成员" in page


def test_english_is_the_default(client, user, tenant):
    client.force_login(user)
    page = client.get("/").content.decode()
    assert '<html lang="en">' in page
    assert ">Team<" in page
    assert "团队" not in page
    page = client.get("/team/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert '<html lang="en">' in page
    assert "Invite someone" in page


def test_language_switcher_sets_chinese_and_back(client, user, tenant):
    client.force_login(user)
    response = client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/team/"})
    assert response.status_code == 302
    assert response["Location"] == "/team/"
    assert client.cookies[settings.LANGUAGE_COOKIE_NAME].value == "zh-hans"

    page = client.get("/team/").content.decode()
    assert '<html lang="zh-hans">' in page
    assert "邀请成员" in page
    # The switcher itself offers both languages by their own names, Chinese selected.
    assert '<option value="zh-hans" selected>简体中文</option>' in page
    assert '<option value="en">English</option>' in page

    client.post("/i18n/setlang/", {"language": "en", "next": "/team/"})
    page = client.get("/team/").content.decode()
    assert '<html lang="en">' in page
    assert "Invite someone" in page


def test_login_page_is_chinese_too(client):
    page = client.get("/accounts/login/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert '<html lang="zh-hans">' in page
    assert "登录" in page and "注册" in page

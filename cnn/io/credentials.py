"""Credentials in URLs, recognised by what they are rather than where they sit: a password in the user info
(`postgresql://u:pw@host/db`) and a credential in the query string (`?password=`, `?sslpassword=`, `?token=`,
`?sig=` of an Azure SAS, `?X-Amz-Signature=` of a presigned URL, `?access_key=`...) are the same secret. Every
place that shows, records or passes on a URL asks `carries_credentials` and shows `redact`."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit

MASK = "***"
# query keys whose value is a credential, by the words credentials are named with (case-insensitive, as parts of
# the key: `sslpassword`, `X-Amz-Security-Token`, `aws_secret_access_key`, `client_secret`, `sig`)
_CREDENTIAL_KEY = re.compile(
    r"pass|pwd|secret|token|credential|signature|^sig$|key|auth|session|sas|cookie|bearer", re.IGNORECASE
)


def is_credential_key(key: str) -> bool:
    """Whether a query parameter named `key` holds a credential."""
    return bool(_CREDENTIAL_KEY.search(key))


def _query(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def _userinfo(url: str) -> str:
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[0] if "@" in netloc else ""


def carries_credentials(url: str) -> bool:
    """Whether `url` holds a credential: a password in its user info, or a credential among its query parameters."""
    if "://" not in url:
        return False
    try:
        return ":" in _userinfo(url) or any(is_credential_key(k) for k, _ in _query(url))
    except ValueError:  # a URL that does not even split: treat as secret, never show it
        return True


def redact(url: str) -> str:
    """`url` with the password of its user info and every credential in its query replaced by ***; the rest of the
    text exactly as given (`sqlite:////abs/path` keeps its four slashes)."""
    if not carries_credentials(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that does not parse>"
    out = url
    user = _userinfo(url)
    if ":" in user:
        out = out.replace(f"{user}@", f"{user.partition(':')[0]}:{MASK}@", 1)
    if parts.query:
        query = "&".join(
            f"{quote(k, safe='')}={MASK if is_credential_key(k) else quote(v, safe='')}" for k, v in _query(url)
        )
        out = out.replace(f"?{parts.query}", f"?{query}", 1)
    return out


def scrub(text: str, url: str) -> str:
    """`text` (an error message about `url`) with every credential `url` holds replaced by ***."""
    user = _userinfo(url)
    found = [user.partition(":")[2]] if ":" in user else []
    try:
        found += [v for k, v in _query(url) if is_credential_key(k)]
    except ValueError:
        pass
    for value in sorted({v for v in found if v}, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text

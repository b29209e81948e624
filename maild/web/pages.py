"""The HTML of maild's pages: string.Template, every substituted value HTML-escaped.

Four small pages do not need a template engine; `render` escapes every value it is
given, so no handler can forget to (values that are HTML already are none: the pages
build their markup here, from escaped parts).
"""

from __future__ import annotations

import html
from string import Template

_LAYOUT = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="no-referrer">
<title>$title</title>
<style>
body { font-family: sans-serif; max-width: 40em; margin: 2em auto; padding: 0 1em; line-height: 1.4 }
.consent { white-space: pre-wrap; border-left: 4px solid #888; padding: .5em 1em; background: #f4f4f4 }
button { font-size: 1.1em; padding: .4em 1.2em }
.error { color: #a00 }
</style>
</head>
<body>
<h1>$title</h1>
$body
</body>
</html>
""")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def render(template: str, title: str, **values: object) -> str:
    """The page: `template` (markup written here) with every value escaped."""
    body = Template(template).substitute({k: esc(v) for k, v in values.items()})
    return _LAYOUT.substitute(title=esc(title), body=body)


SUBSCRIBE_FORM = """
<p>Subscribe to the mailing list <strong>$name</strong> &lt;$list_id&gt;, run by $owner.</p>
<p>By subscribing you agree to this:</p>
<div class="consent" id="consent">$consent</div>
<form method="post" action="$action">
<input type="hidden" name="csrf" value="$csrf">
<p><label for="address">Your email address</label><br>
<input type="email" id="address" name="address" required size="40" autocomplete="email"></p>
<p><button type="submit" id="subscribe">Subscribe</button></p>
</form>
<p>You will get a message asking you to confirm; until you do, you are not subscribed.</p>
"""

SUBSCRIBE_SENT = """
<p id="result">Thank you. If <strong>$address</strong> can be subscribed to $name, a message
asking you to confirm is on its way to it. Until you confirm, you are not subscribed and
get no list mail.</p>
"""

CONFIRM_FORM = """
<p>Confirm that <strong>$address</strong> subscribes to the mailing list <strong>$name</strong>
&lt;$list_id&gt;. By confirming you agree to this:</p>
<div class="consent" id="consent">$consent</div>
<form method="post" action="$action">
<input type="hidden" name="csrf" value="$csrf">
<p><button type="submit" id="confirm">Confirm my subscription</button></p>
</form>
<p>If you did not ask to subscribe, close this page: nothing happens unless you press the button.</p>
"""

CONFIRMED = """
<p id="result"><strong>$address</strong> is now subscribed to $name. Every list message
lets you leave with one click.</p>
"""

UNSUBSCRIBE_FORM = """
<p>Unsubscribe <strong>$address</strong> from the mailing list <strong>$name</strong> &lt;$list_id&gt;?</p>
<form method="post" action="$action">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<p><button type="submit" id="unsubscribe">Unsubscribe</button></p>
</form>
"""

UNSUBSCRIBED = """
<p id="result"><strong>$address</strong> is unsubscribed from $name. You will get no more
mail from this list.</p>
"""

PROBLEM = """
<p class="error" id="result">$message</p>
"""


def problem(title: str, message: str) -> str:
    return render(PROBLEM, title, message=message)

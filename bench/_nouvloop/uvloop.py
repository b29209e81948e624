"""Stand-in that hides an installed uvloop: maild then runs on plain asyncio.

bench.common.MaildProc puts this directory first on maild's PYTHONPATH for the
"asyncio" configuration, so "with and without uvloop" can be measured on one machine.
"""

raise ImportError("uvloop hidden by bench/_nouvloop for the asyncio configuration")

"""maild: a mail-server hygiene daemon deployed in front of Postfix."""

__version__ = "0.1.0"

"""The SMTP side: the aiosmtpd server, the proxy handler and the downstream relay."""

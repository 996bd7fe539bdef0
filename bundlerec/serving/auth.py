"""Bearer-token authentication of the Serve endpoint: the accepted tokens and the token file.

Tokens come from configuration only: an environment variable (comma-separated) and/or a secret file
(one token per line, ``#`` comments allowed). Several tokens may be valid at once, so a token is
rotated by adding the new one, moving clients over, then removing the old one; the file is re-read
when it changes (inode, size or modification time), so rotation needs no redeploy; an empty read is
not taken. Tokens are kept only as SHA-256
digests and compared in constant time. No token is ever logged.

    401 -- no ``Authorization: Bearer …`` header (with ``WWW-Authenticate: Bearer``)
    403 -- a token that is not one of the configured ones
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from typing import Optional

TOKENS_ENV = "BUNDLEREC_API_TOKENS"
MIN_TOKEN_CHARS = 24  # secrets.token_urlsafe(32) gives 43; a short token is a guessable token


class AuthConfigError(ValueError):
    """Authentication was asked for but no usable token is configured."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_token_file(path: str) -> list[str]:
    with open(path) as f:
        return [t.strip() for t in f if t.strip() and not t.lstrip().startswith("#")]


def write_token_file(path: str, token: Optional[str] = None) -> str:
    """Write a fresh (or the given) token to ``path`` with mode 0600; returns the token. The file is
    replaced atomically (written beside it, then renamed): a replica re-reading it mid-rotation sees
    the old file or the new one, never an empty or half-written one."""
    token = token or secrets.token_urlsafe(32)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return token


class TokenAuth:
    """The set of accepted tokens (environment + secret file), re-read when the file changes."""

    def __init__(self, token_file: Optional[str] = None, env_var: str = TOKENS_ENV):
        self.token_file, self.env_var = token_file, env_var
        self._lock = threading.Lock()
        self._mtime: Optional[tuple] = None  # the token file's _stamp() when it was last read
        self._digests: list[bytes] = []
        self._reload(force=True)
        if not self._digests:
            raise AuthConfigError(f"authentication is on but no token is configured: set {env_var} "
                                  f"or give a token file (got {token_file!r})")

    def _stamp(self) -> Optional[tuple]:
        """What identifies one version of the token file: inode, size and mtime in nanoseconds (a
        rewrite within one mtime tick still differs in inode or size)."""
        try:
            st = os.stat(self.token_file) if self.token_file else None
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns) if st else None

    def _reload(self, force: bool = False) -> None:
        stamp = self._stamp()
        if not force and stamp == self._mtime:
            return
        tokens = [t.strip() for t in os.environ.get(self.env_var, "").split(",") if t.strip()]
        if self.token_file:
            if stamp is None:
                raise AuthConfigError(f"token file {self.token_file} does not exist")
            from_file = read_token_file(self.token_file)
            if not from_file and not force:  # caught mid-write by a non-atomic writer: keep what is loaded,
                raise AuthConfigError(f"token file {self.token_file} is empty")  # read it again next time
            tokens += from_file
        short = sum(len(t) < MIN_TOKEN_CHARS for t in tokens)
        if short:  # counted, never shown
            raise AuthConfigError(f"{short} configured token(s) shorter than {MIN_TOKEN_CHARS} characters "
                                  f"({self.env_var} / {self.token_file}); generate one with "
                                  "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        with self._lock:
            self._digests, self._mtime = [_digest(t) for t in tokens], stamp

    def __len__(self) -> int:
        return len(self._digests)

    def verify(self, token: str) -> bool:
        try:
            self._reload()
        except (OSError, AuthConfigError):
            pass  # file briefly missing during a rotation: keep the tokens already loaded
        d = _digest(token)
        ok = False
        for known in self._digests:  # no early exit: time does not depend on which token matched
            ok |= hmac.compare_digest(d, known)
        return ok

    def check(self, authorization: Optional[str]) -> Optional[tuple[int, str]]:
        """None if allowed, else (status, message) for the HTTP error."""
        token = bearer_token(authorization)
        if token is None:
            return 401, MISSING
        if not self.verify(token):
            return 403, INVALID
        return None


MISSING, INVALID = "missing bearer token (send 'Authorization: Bearer <token>')", "invalid token"


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, None without one."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None

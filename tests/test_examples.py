"""The runnable examples in examples/ run and check their own results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_payments_example_charges_each_payment_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "payments.py"), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "stored: 3" in out  # the retried send was stored once
    assert "pay-2 (attempt 2): already charged, only acked" in out
    assert "receipts: ['pay-1/0', 'pay-2/0', 'pay-3/0']" in out
    assert "balances: {'alice': 8651, 'bob': 4300}" in out

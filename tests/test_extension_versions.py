"""Extension versions as comparable numbers: the variant ranges of extension collectors are written in them."""

from __future__ import annotations

from exporter.collectors.statements import STATEMENTS
from exporter.db import extension_version_number


def test_a_patch_level_does_not_order_above_the_next_minor() -> None:
    assert extension_version_number("1.4.1") == 104
    assert extension_version_number("1.4.1") < extension_version_number("1.10") == 110
    assert extension_version_number("1.7") == 107
    assert extension_version_number("2.0beta1") == 200
    assert extension_version_number("3") == 300


def test_an_extension_patch_release_keeps_its_minor_variant() -> None:
    # pg_stat_statements 1.4.1 must read like 1.4, not like 1.11 (141 used to fall into [111, inf)).
    assert STATEMENTS.variant_for(extension_version_number("1.4.1")) is STATEMENTS.variant_for(104)
    assert STATEMENTS.variant_for(extension_version_number("1.10.2")) is STATEMENTS.variant_for(110)

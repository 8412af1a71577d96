"""The fixtures the serving tests share, imported by name into their modules (pytest finds fixtures there): the
tiny base and adapters of `adapter_factory.tiny_adapters` (faq-en, talk-sv), and a runtime holding both."""

from __future__ import annotations

import pytest

from adapter_factory import tiny_adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return tiny_adapters(tmp_path_factory)


@pytest.fixture(scope="module")
def rt(adapters):
    from lora_chat.runtime import AdapterSet

    _, en, sv = adapters
    return AdapterSet.open([en, sv])

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """``(directory, model)``: a tiny random Llama saved with save_pretrained, and the model itself."""
    from _engine import save_tiny_llama

    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, save_tiny_llama(directory)

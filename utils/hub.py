"""Where a --model_checkpoint comes from: a local folder, the local Hugging Face cache, or the hub,
and never minutes of retries against a hub that cannot be reached (Hugging Face's own client
retries that long before it gives up).

It imports only huggingface_hub, so a script can check its flags in a fraction of a second,
before torch, transformers and the data load: train.py does.
"""
import os
import threading
import urllib.error
import urllib.request

from utils.errors import VLMError

HUB_PROBE_SECONDS = 3.0  # how long a hub name waits for the hub to answer before giving up


def hub_unreachable(timeout=HUB_PROBE_SECONDS):
    """None if the hub answers one HTTP request (any status; through the proxy the environment
    names, as Hugging Face's client would) within `timeout` seconds, else why not (a few words)."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    result = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:  # an answer, if not a welcome one: the hub is there
            result.append(None)
        except (OSError, ValueError) as error:  # URLError, refused, reset, timeout, TLS, bad URL
            reason = getattr(error, "reason", None) or error
            result.append(str(getattr(reason, "strerror", None) or reason).lower())

    probe = threading.Thread(target=ask, daemon=True)  # a name lookup can outlast any timeout
    probe.start()
    probe.join(timeout)
    if result and result[0] is None:
        return None
    why = result[0] if result else f"no answer within {timeout:g} s"
    return f"the Hugging Face hub {endpoint} cannot be reached ({why})"


def in_local_cache(name):
    """Whether the local Hugging Face cache holds the config of hub model `name`."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid hub name (e.g. a path to a missing folder)
        return False


def require_hub(name, flag="--model_checkpoint"):
    """Return if hub model `name` can be downloaded now; else one VLMError saying how to get it."""
    from huggingface_hub import constants

    why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else hub_unreachable()
    if why:
        folder = os.path.basename(os.path.normpath(name)) or "model"
        raise VLMError(f"{flag} {name}: no such local folder, and the model cannot be downloaded: {why}. "
                       f"Download it where the hub is reachable (`hf download {name} --local-dir {folder}`, "
                       f"or `huggingface-cli download {name} --local-dir {folder}`), copy the folder here "
                       f"and pass it: {flag} {folder}")


def check_model_source(name, flag="--model_checkpoint"):
    """'folder', 'cache' or 'hub': where `name` will load from; a VLMError (within seconds) if
    it is a hub name that is neither cached nor downloadable now."""
    if os.path.isdir(name):
        return "folder"
    if in_local_cache(name):
        return "cache"
    require_hub(name, flag)
    return "hub"

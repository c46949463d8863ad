"""Exit 0 when real checkpoints can be used here (a CUDA GPU and the Hugging Face Hub reachable,
or the repository already cached); otherwise print why and exit 1. Used by scripts/run.sh."""

import sys

import torch


def main(repo_id: str) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU found")
        return 1
    from huggingface_hub import model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "photomaker-v1.bin"), str):
        return 0
    try:
        model_info(repo_id, timeout=10)
    except Exception as error:  # offline, firewalled, or HF_HUB_OFFLINE set
        print(f"the Hugging Face Hub is not reachable ({type(error).__name__})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

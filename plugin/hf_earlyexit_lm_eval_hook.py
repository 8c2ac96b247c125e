"""Registers lm-eval's `ee-hf` model type the moment lm-eval's registry is imported (installed next to a `.pth`
file that imports this module at interpreter start-up; it imports nothing heavy itself).

lm-eval 0.4.13 discovers no plugins: its CLI looks models up only in `lm_eval.api.registry.model_registry`. This
one-shot import hook lets the unmodified `lm_eval` command find `--model ee-hf`.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "lm_eval.api.registry"


class _RegistryHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot: find the real module with the other finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            try:
                from hf_earlyexit.evaluation.lm_eval_plugin import register

                register()
            except Exception as err:  # never break lm-eval itself
                print(f"hf-earlyexit: could not register the ee-hf model type ({err})", file=sys.stderr)

        loader.exec_module = exec_module
        return spec


if _TARGET not in sys.modules and not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegistryHook())

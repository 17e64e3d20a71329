"""Writes /opt/aider/model-metadata.json: the chat models of litellm's bundled price list,
also under their `provider/` names, for `aider --model-metadata-file`. With it (and
LITELLM_LOCAL_MODEL_COST_MAP=True) aider knows these models' context windows and prices
without downloading litellm's list from raw.githubusercontent.com, which it otherwise does
on every run whose HOME has no fresh cache. Kept small: aider parses it with json5 (slow)."""
import glob
import json

PROVIDERS = {"openai", "anthropic", "gemini", "deepseek", "mistral", "xai", "groq", "openrouter"}
FIELDS = ("max_tokens", "max_input_tokens", "max_output_tokens", "input_cost_per_token",
          "output_cost_per_token", "litellm_provider", "mode", "supports_vision",
          "supports_function_calling")

src = glob.glob("/opt/aider/lib/python3*/site-packages/litellm/model_prices_and_context_window_backup.json")[0]
models = {}
for name, info in json.load(open(src)).items():
    if not isinstance(info, dict) or info.get("mode") != "chat":
        continue
    provider = info.get("litellm_provider")
    if provider not in PROVIDERS:
        continue
    slim = {f: info[f] for f in FIELDS if f in info}
    models[name] = slim
    if not name.startswith(provider + "/"):
        models[provider + "/" + name] = slim
with open("/opt/aider/model-metadata.json", "w") as out:
    json.dump(models, out, separators=(",", ":"))
print(f"{len(models)} models in /opt/aider/model-metadata.json")

"""A trained policy as an MLflow pyfunc model ("models from code": MLflow stores this file with
the model and runs it on load, so loading needs no resrl import, only transformers and torch).

The model's one artifact, `policy`, is the Hugging Face folder (safetensors + tokenizer) of the
final checkpoint. Load and use it anywhere the tracking store is reachable, offline:

    import mlflow
    policy = mlflow.pyfunc.load_model("models:/<model id>")        # or "models:/<name>@best"
    policy.predict(["Q: 3+4+1+2=?\\nA:"])                            # -> ["7+4=11, ..."]
    policy.predict(pd.DataFrame({"prompt": [...]}))

`predict` completes each prompt greedily with up to `max_new_tokens` tokens (the model config,
set to the run's eval.max_tokens; `params={"max_new_tokens": N}` overrides it per call) and returns
the completions without the prompt. For the raw weights, download the `policy` artifact folder.
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

# No type hints on predict: MLflow would infer a signature from them that has no params schema and
# replace the logged one (which declares `max_new_tokens`). MLflow then prints its "Add type hints"
# advice once per save/load, under a warnings filter of its own that callers cannot override.


class PolicyModel(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["policy"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", 48))

    def predict(self, context, model_input, params=None):
        import torch

        if hasattr(model_input, "columns"):  # a DataFrame: its `prompt` column (else its first one)
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        eos = self.tokenizer.eos_token_id
        out = []
        with torch.no_grad():
            for prompt in prompts:  # one at a time: no padding, the same tokens as a batch of one
                ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids  # as resrl.data
                gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                          do_sample=False, eos_token_id=eos, pad_token_id=eos)
                out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


mlflow.models.set_model(PolicyModel())

"""The MLflow pyfunc flavour of a faceforge checkpoint: ``mlflow.pyfunc.load_model(uri).predict(df)``.

Input: a DataFrame with ``prompt`` and optional ``seed``, ``steps``, ``guidance``, ``mask_png`` (base64 PNG of a
label map or colour-coded mask) and ``sketch_png``. Output: a DataFrame with ``image_png`` (base64 PNG).
``steps`` and ``guidance`` default to the model's own sampler settings.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import numpy as np


def decode_png(data: str | None) -> np.ndarray | None:
    if not data or (isinstance(data, float) and np.isnan(data)):
        return None
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def encode_png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class FaceforgePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from modeling.examples import load_examples
        from modeling.generator import FaceGenerator

        layout = load_examples(context.artifacts["examples"]).layout if "examples" in context.artifacts else None
        self.generator = FaceGenerator(
            context.artifacts["weights"], base_from=context.artifacts.get("base"), default_layout=layout
        )

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from modeling.conditions import as_sketch, mask_to_labels
        from modeling.generator import GenerationRequest

        frame = pd.DataFrame(model_input)
        requests = []
        for _, row in frame.iterrows():
            mask, sketch = decode_png(row.get("mask_png")), decode_png(row.get("sketch_png"))
            requests.append(
                GenerationRequest(
                    prompt=str(row.get("prompt", "") or ""),
                    mask=None if mask is None else mask_to_labels(mask),
                    sketch=None if sketch is None else as_sketch(sketch),
                    seed=int(row.get("seed", 0) or 0),
                )
            )
        steps = int(frame["steps"].iloc[0]) if "steps" in frame else None
        guidance = float(frame["guidance"].iloc[0]) if "guidance" in frame else None
        images = self.generator.generate(requests, steps=steps, guidance=guidance)
        return pd.DataFrame({"image_png": [encode_png(image) for image in images]})

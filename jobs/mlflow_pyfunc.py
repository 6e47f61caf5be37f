"""The bundle as an MLflow pyfunc model (MLflow "models from code": this file is the model).

``mlflow.pyfunc.load_model("models:/supersub/N").predict(df)`` takes a DataFrame with an
``image`` column of encoded images (JPEG, PNG, WebP, ... bytes) and returns one row per image:
superclass and subclass (id, name), the subclass probability and the routing that produced it
(the bundle's served routing). The bundle itself is the model's ``bundle`` artifact, loaded and
verified (sha256 of every file) by :func:`supersub.bundle.load_bundle`; nothing is unpickled.
"""

from __future__ import annotations

import mlflow
import pandas as pd


class SupersubModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from supersub.bundle import load_bundle
        from supersub.data import build_transforms
        from supersub.data.dataset import eval_draft_size

        self.bundle = load_bundle(context.artifacts["bundle"])
        self.predictor = self.bundle.predictor("cpu")
        self.routing = self.bundle.routing()
        self.transform = build_transforms(self.bundle.image_size, train=False)
        self.draft = eval_draft_size(self.bundle.image_size)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        from supersub.data.images import decode_image

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        if "image" not in frame:
            raise ValueError("expected a DataFrame with an 'image' column of encoded image bytes")
        images = []
        for i, data in enumerate(frame["image"]):
            decoded = decode_image(bytes(data), draft_size=self.draft)
            if decoded.image is None:
                raise ValueError(f"row {i}: not a readable image ({decoded.events[-1]})")
            images.append(self.transform(decoded.image))
        fine, sup = self.predictor.predict(torch.stack(images), self.routing)
        h = self.bundle.hierarchy
        rows = []
        for f, s in zip(fine.argmax(1).tolist(), sup.argmax(1).tolist()):
            rows.append({"superclass_id": h.superclasses[s].id, "superclass": h.superclasses[s].name,
                         "subclass_id": h.subclasses[f].id, "subclass": h.subclasses[f].name})
        out = pd.DataFrame(rows)
        out["probability"] = fine.max(1).values.double().numpy()
        out["routing"] = str(self.routing)
        return out


mlflow.models.set_model(SupersubModel())

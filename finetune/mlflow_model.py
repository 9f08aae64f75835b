"""The code of the logged MLflow model (models-from-code): MLflow runs this file to get the model.

Kept to one statement so that the logged model holds no pickled objects, only this code, the
weights and the spec (see `finetune.serving`).
"""

from mlflow.models import set_model

from finetune.serving import ImageClassifierModel

set_model(ImageClassifierModel())

"""The code of the logged MLflow model (models-from-code): MLflow runs this file to get the model.

Kept to one statement so that the logged model holds no pickled objects, only this code, the
weights and the spec (see `finetune.tracking.pyfunc`).
"""

from mlflow.models import set_model

from finetune.tracking.pyfunc import ImageClassifierModel

set_model(ImageClassifierModel())

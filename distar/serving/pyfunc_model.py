"""The model code of distar's MLflow pyfunc (MLflow models-from-code: this file is stored in the model and run
at load time; nothing is pickled). The distar package travels in the model's code/ directory."""
import mlflow

from distar.serving.pyfunc import DistarGenerator

mlflow.models.set_model(DistarGenerator())

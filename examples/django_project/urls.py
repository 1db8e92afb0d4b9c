"""The example's one URL: ``POST /welcome/``."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [path("welcome/", views.welcome, name="welcome")]

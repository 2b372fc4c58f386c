"""Flask-WTF forms: CSRF on every form, validation messages shown next to fields."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import (BooleanField, DateField, EmailField, HiddenField, IntegerField, PasswordField, SelectField,
                     SelectMultipleField, StringField, TextAreaField)
from wtforms.validators import DataRequired, EqualTo, Length, NumberRange, Optional, Regexp

from ..store.access import ROLE_NAMES
from ..store.patients import MRN_MAX, MRN_RULE
from ..vocab import PRIORITIES

ROLE_CHOICES = [(k, v) for k, v in ROLE_NAMES.items() if k != "admin"] + [("admin", ROLE_NAMES["admin"])]

Email = lambda: Regexp(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", message="Enter a valid email address.")  # noqa: E731


class SetupForm(FlaskForm):
    name = StringField("Your name", validators=[DataRequired(), Length(max=200)])
    email = EmailField("Email", validators=[DataRequired(), Email(), Length(max=255)])
    password = PasswordField("Password", validators=[DataRequired(), Length(min=10, max=256)])
    confirm = PasswordField("Repeat password", validators=[DataRequired(), EqualTo("password", "Passwords differ.")])


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=255)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=256)])


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired()])
    password = PasswordField("New password", validators=[DataRequired(), Length(min=10, max=256)])
    confirm = PasswordField("Repeat new password", validators=[DataRequired(), EqualTo("password", "Passwords differ.")])


class UserForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=200)])
    email = EmailField("Email", validators=[DataRequired(), Email(), Length(max=255)])
    role = SelectField("Role", choices=ROLE_CHOICES)
    password = PasswordField("Initial password", validators=[DataRequired(), Length(min=10, max=256)])


class ResetPasswordForm(FlaskForm):
    password = PasswordField("New password", validators=[DataRequired(), Length(min=10, max=256)])


class RoleForm(FlaskForm):
    role = SelectField("Role", choices=ROLE_CHOICES)


class EmptyForm(FlaskForm):
    """For POST-only buttons (CSRF token only)."""


class PatientForm(FlaskForm):
    # the character set is checked by the store (patients.mrn_problem), for the API and pre-fills too
    mrn = StringField("Medical record number (MRN)", description=MRN_RULE,
                      validators=[DataRequired(), Length(max=MRN_MAX)])
    family_name = StringField("Family name", validators=[DataRequired(), Length(max=100)])
    given_name = StringField("Given name", validators=[Optional(), Length(max=100)])
    birth_date = DateField("Birth date", validators=[Optional()])
    sex = SelectField("Sex", choices=[("unknown", "Unknown"), ("female", "Female"), ("male", "Male"), ("other", "Other")])
    notes = TextAreaField("Notes", validators=[Optional(), Length(max=5000)])


class AssignForm(FlaskForm):
    doctors = SelectMultipleField("Staff who may see this patient", coerce=int)


class CaseForm(FlaskForm):
    analyzer_id = SelectField("Analyzer", validators=[DataRequired()])
    priority = SelectField("Priority", choices=list(PRIORITIES.items()), default="routine",
                           validators=[DataRequired()])
    clinical_note = TextAreaField("Clinical note", validators=[Optional(), Length(max=5000)])


class SignForm(FlaskForm):
    final_diagnosis = SelectField("Final diagnosis", validators=[DataRequired("Choose a diagnosis.")])
    override_reason = TextAreaField("Reason for overriding the AI result", validators=[Optional(), Length(max=5000)])
    uncertainty_note = TextAreaField("Note for signing an uncertain / out-of-domain result",
                                     validators=[Optional(), Length(max=5000)])
    comment = TextAreaField("Comment for the report", validators=[Optional(), Length(max=10000)])
    amendment_reason = TextAreaField("Reason for the amendment", validators=[Optional(), Length(max=5000)])
    confirm = BooleanField("I have reviewed the images and take responsibility for this diagnosis",
                           validators=[DataRequired("Confirm that you reviewed the case.")])
    confirm_unverified = BooleanField("Sign although some cells are not verified (their AI class counts) or still "
                                      "unidentified")
    # the case revision the signer looked at: signing fails if images were added since
    revision = HiddenField(validators=[Optional(), Regexp(r"^\d{1,9}$")])


class WbcCountForm(FlaskForm):
    wbc_count = StringField("WBC count (x10^9/L)", validators=[Optional(), Length(max=12)])


class TokenForm(FlaskForm):
    name = StringField("Name (what uses it)", validators=[DataRequired(), Length(max=100)])
    expires_in_days = IntegerField("Expires after (days)", validators=[Optional(), NumberRange(1, 3650)])


class PreliminaryForm(FlaskForm):
    diagnosis = SelectField("Preliminary diagnosis", validators=[DataRequired("Choose a diagnosis.")])
    comment = TextAreaField("Comment for the doctor", validators=[Optional(), Length(max=10000)])
    revision = HiddenField(validators=[Optional(), Regexp(r"^\d{1,9}$")])


class SecondReadForm(FlaskForm):
    diagnosis = SelectField("Your diagnosis", validators=[DataRequired("Choose a diagnosis.")])
    comment = TextAreaField("Comment", validators=[Optional(), Length(max=10000)])
    confirm = BooleanField("I have reviewed the images and give my own reading",
                           validators=[DataRequired("Confirm that you reviewed the case.")])
    revision = HiddenField(validators=[Optional(), Regexp(r"^\d{1,9}$")])


class CancelForm(FlaskForm):
    reason = TextAreaField("Reason for cancelling", validators=[DataRequired("Give the reason."), Length(max=2000)])


class ConsultForm(FlaskForm):
    consultant_id = SelectField("Ask", coerce=int)  # 0: any reviewer
    question = TextAreaField("Question", validators=[DataRequired("Write the question."), Length(max=5000)])
    image_id = SelectField("About image", coerce=int, validators=[Optional()])  # 0: the whole case
    region = HiddenField(validators=[Optional(), Regexp(r"^\d{1,6},\d{1,6},\d{1,6},\d{1,6}$",
                                                          message="Draw the box on the image again.")])
    cell_ids = HiddenField(validators=[Optional(), Regexp(r"^\d{1,10}(,\d{1,10}){0,199}$",
                                                          message="Select the cells again (at most 200).")])


class AnswerForm(FlaskForm):
    body = TextAreaField("Answer", validators=[DataRequired("Write the answer."), Length(max=5000)])


class WorkflowSettingsForm(FlaskForm):
    release_preliminary = BooleanField("Preliminary results may be sent to the hospital system (marked preliminary)")

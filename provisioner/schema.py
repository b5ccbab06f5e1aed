"""RFC 7643's User schemas, for checking a mapping when the target's ``/Schemas`` is not known.

:data:`RFC7643_SCHEMAS` holds the core User schema (RFC 7643 §4.1, §8.7.1)
and the enterprise extension (§4.3), as :class:`connectors.Schema` values,
the same shape ``ScimClient.schemas()`` discovers from a target.
"""

from __future__ import annotations

from connectors import AttributeInfo, Schema

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


def _attribute(name: str, *subs: AttributeInfo, **characteristics: object) -> AttributeInfo:
    kind = "complex" if subs else characteristics.pop("type", "string")
    return AttributeInfo(name=name, type=str(kind), sub_attributes=subs, **characteristics)  # type: ignore[arg-type]


def _multi(name: str, value_type: str = "string", *extra: AttributeInfo, **characteristics: object) -> AttributeInfo:
    """A multi-valued attribute with RFC 7643 §2.4's sub-attributes: value, display, type, primary."""
    subs = (
        _attribute("value", type=value_type),
        _attribute("display"),
        _attribute("type"),
        _attribute("primary", type="boolean"),
        *extra,
    )
    return _attribute(name, *subs, multi_valued=True, **characteristics)


_NAME = _attribute(
    "name",
    *(_attribute(n) for n in ("formatted", "familyName", "givenName", "middleName", "honorificPrefix", "honorificSuffix")),
)
_ADDRESS = _attribute(
    "addresses",
    *(_attribute(n) for n in ("formatted", "streetAddress", "locality", "region", "postalCode", "country", "type")),
    _attribute("primary", type="boolean"),
    multi_valued=True,
)
_GROUPS = _attribute(
    "groups",
    _attribute("value", mutability="readOnly"),
    _attribute("$ref", type="reference", mutability="readOnly"),
    _attribute("display", mutability="readOnly"),
    _attribute("type", mutability="readOnly"),
    multi_valued=True,
    mutability="readOnly",
)

# RFC 7643 §3.1: attributes of every resource, which a target's /Schemas need not list.
COMMON_ATTRIBUTES: dict[str, AttributeInfo] = {
    "externalid": _attribute("externalId", case_exact=True),
}

RFC7643_SCHEMAS: dict[str, Schema] = {
    CORE_USER: Schema(
        id=CORE_USER,
        name="User",
        attributes=(
            _attribute("id", mutability="readOnly", returned="always", case_exact=True, uniqueness="server"),
            _attribute("externalId", case_exact=True),
            _attribute("meta", _attribute("resourceType"), _attribute("created"), _attribute("lastModified"),
                       _attribute("location"), _attribute("version"), mutability="readOnly"),  # fmt: skip
            _attribute("userName", required=True, uniqueness="server"),
            _NAME,
            *(_attribute(n) for n in ("displayName", "nickName", "title", "userType", "preferredLanguage", "locale",
                                      "timezone")),  # fmt: skip
            _attribute("profileUrl", type="reference"),
            _attribute("active", type="boolean"),
            _attribute("password", mutability="writeOnly", returned="never"),
            _multi("emails"),
            _multi("phoneNumbers"),
            _multi("ims"),
            _multi("photos", "reference"),
            _ADDRESS,
            _GROUPS,
            _multi("entitlements"),
            _multi("roles"),
            _multi("x509Certificates", "binary"),
        ),
    ),
    ENTERPRISE_USER: Schema(
        id=ENTERPRISE_USER,
        name="EnterpriseUser",
        attributes=(
            *(_attribute(n) for n in ("employeeNumber", "costCenter", "organization", "division", "department")),
            _attribute(
                "manager",
                _attribute("value"),
                _attribute("$ref", type="reference"),
                _attribute("displayName", mutability="readOnly"),
            ),
        ),
    ),
}
